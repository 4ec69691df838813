"""Houlsby bottleneck adapters (lmforge/model/bottleneck.py): identity at init, what trains, `--adapter` runs of sft,
dpo and grpo (saving, exact resume, loading unmerged, no reference copy), and the commands that refuse such a run."""

from __future__ import annotations

import json
import math
import shutil
import types

import pytest
import torch

from lmforge.chat.template import ChatFormat
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.bottleneck import (
    AdapterConfig,
    BottleneckLinear,
    adapter_tensors,
    apply_adapters,
    load_adapter_tensors,
)
from lmforge.model.lora import adapters_disabled
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.serve.generate import FusedDecoder, generate
from lmforge.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Learnable Q/A conversations (the answer repeats the question's number), OpenAI `messages` JSONL."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {i % 37} twice"},
                          {"role": "assistant", "content": f"{i % 37} {i % 37}"}]} for i in range(300)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_args(base, data, out, *extra):
    return ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "12",
            "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--set", "warmup_steps=2", "--set", "log_every=3",
            "--set", "eval_every=6", "--set", "samples=2", "--set", "val_fraction=0.1", *extra]  # fmt: skip


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, max_seq_len=32))


# ----------------------------------------------------------------------------- the layer


def test_adapters_start_at_the_base_train_only_themselves_and_switch_off():
    model = _tiny()
    x = torch.randint(0, 64, (2, 16))
    before, _ = model(x)
    names = set(model.state_dict())
    apply_adapters(model, AdapterConfig())
    assert torch.equal(model(x)[0], before)  # up = 0: training starts exactly at the base model
    assert names <= set(model.state_dict())  # the base's tensors keep their names: base checkpoints load
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n for n in trainable)
    d, m, n_layer = 32, 64, 2
    assert sum(trainable.values()) == 2 * n_layer * (2 * d * m + m + d)  # after attention and after the MLP
    assert set(adapter_tensors(model)) == set(trainable)
    assert isinstance(model.layers[0].self_attn.o_proj, BottleneckLinear)
    assert isinstance(model.layers[0].mlp.down_proj, BottleneckLinear)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter_up" in n:
                p.normal_(std=0.1)
    adapted, _ = model(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    with adapters_disabled(model):
        assert torch.equal(model(x)[0], before)
    assert torch.equal(model(x)[0], adapted)  # switched back on


def test_adapter_config_checks_and_round_trips():
    for bad, match in [(AdapterConfig(size=0), "size"), (AdapterConfig(dropout=1.0), "dropout"),
                       (AdapterConfig(targets=("qkv",)), "targets")]:  # fmt: skip
        with pytest.raises(LmforgeError, match=match):
            bad.validate()
    d = AdapterConfig(size=8, targets=("o_proj",)).to_dict()
    assert d["kind"] == "bottleneck" and AdapterConfig.from_dict(d) == AdapterConfig(size=8, targets=("o_proj",))


def test_load_adapter_tensors_checks_names_and_shapes():
    model = apply_adapters(_tiny(), AdapterConfig(size=4))
    tensors = adapter_tensors(model)
    load_adapter_tensors(model, tensors, "a")
    with pytest.raises(LmforgeError, match="does not fit"):
        load_adapter_tensors(model, {k: v for k, v in list(tensors.items())[1:]}, "a")
    with pytest.raises(LmforgeError, match="has shape"):
        load_adapter_tensors(apply_adapters(_tiny(), AdapterConfig(size=8)), tensors, "a")


# ----------------------------------------------------------------------------- lmforge sft --adapter


def _greedy(model, prompt, n, stop_ids):
    """Greedy tokens from the model's full forward at every step (no cache): the reference for generate()."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            if t in stop_ids:
                break
            out.append(t)
            ids.append(t)
    return out


def test_sft_adapter_run_saves_resumes_and_loads_unmerged(base_run, chats, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_sft_args(base_run, chats, a, "--adapter", "--set", "adapter_size=8")) == 0
    assert "adapters m=8" in capsys.readouterr().err
    last = ckpt.resolve_checkpoint(a)
    assert (last / "adapter.safetensors").is_file() and not (last / "model.safetensors").exists()
    meta = ckpt.read_meta(last)
    assert meta["adapter"] == {"kind": "bottleneck", "size": 8, "dropout": 0.0, "targets": ["o_proj", "down_proj"]}
    evals = [r["val_loss"] for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evals[-1] < evals[0]
    # Stopped after step 1, then resumed: the same losses as the straight run.
    assert main(_sft_args(base_run, chats, b, "--adapter", "--set", "adapter_size=8", "--set", "max_seconds=1e-9")) == 0
    assert ckpt.read_meta(ckpt.resolve_checkpoint(b))["step"] == 1
    assert main(_sft_args(base_run, chats, b, "--adapter", "--set", "adapter_size=8")) == 0
    assert _losses(a) == _losses(b) and len(_losses(a)) >= 4
    assert main(_sft_args(base_run, chats, b, "--adapter", "--set", "adapter_size=4", "--max-steps", "20")) == 2
    assert "cannot resume: adapter_size is 8" in capsys.readouterr().err

    # Loaded for inference: the base with the adapter layers in it (unmerged), equal to base + adapter by hand.
    model, tok_dir, _ = ckpt.load_for_inference(a)
    assert isinstance(model.layers[1].mlp.down_proj, BottleneckLinear)
    by_hand = apply_adapters(ckpt.load_model(base_run)[0], AdapterConfig(size=8)).eval()
    load_adapter_tensors(by_hand, ckpt.load_tensors(last / "adapter.safetensors"), "adapter")
    fmt = ChatFormat(tok_dir)
    prompts = [fmt.encode([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("say 5 twice", "say 12 twice please")]  # fmt: skip
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert torch.equal(model(x)[0], by_hand(x)[0])
        with adapters_disabled(model):
            assert torch.equal(model(x)[0], ckpt.load_for_inference(base_run)[0](x)[0])
    # Generation (generate, chat, serve) runs the model's own forward: the fused step does not know these layers.
    assert not FusedDecoder.supports(model)
    want = [_greedy(model, p, 12, fmt.stop_ids) for p in prompts]
    assert generate(model, prompts, 12, temperature=0, stop_ids=fmt.stop_ids) == want  # a left-padded batch
    assert any(want)
    capsys.readouterr()
    assert main(["generate", str(a), "--chat", "--prompt", "say 5 twice", "--prompt", "say 12 twice please",
                 "--temperature", "0", "--max-new-tokens", "12"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert all(fmt.tokenizer.decode(ids) in printed for ids in want)


def test_adapter_run_refuses_a_changed_base_and_being_a_base(base_run, chats, tmp_path, capsys):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    out = tmp_path / "adapter"
    assert main(_sft_args(base, chats, out, "--adapter", "--max-steps", "2", "--set", "samples=0")) == 0
    ckpt.load_for_inference(out)  # fine while the base is unchanged
    assert main(_sft_args(out, chats, tmp_path / "next", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("lmforge: error:") == 1 and "do not fold into the weights" in err and "--adapter" in err
    weights = ckpt.resolve_checkpoint(base) / "model.safetensors"
    tensors = ckpt.load_tensors(weights)
    tensors["norm.weight"] += 1.0
    save_file(tensors, str(weights))
    with pytest.raises(LmforgeError, match="bottleneck adapter was trained on base weights .* different weights"):
        ckpt.load_for_inference(out)


def test_adapter_run_is_refused_by_export_and_quantize(base_run, chats, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(_sft_args(base_run, chats, out, "--adapter", "--max-steps", "1", "--set", "samples=0")) == 0
    capsys.readouterr()
    for args in (["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")],
                 ["export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
                 ["quantize", str(out), "--out", str(tmp_path / "q")]):  # fmt: skip
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a bottleneck-adapter run" in err, (args, err)
    assert not any((tmp_path / name).exists() for name in ("hf", "m.gguf", "q"))


def test_adapter_flags_conflict_in_one_line(base_run, chats, tmp_path, capsys):
    for extra, message in [(("--lora", "--adapter"), "--lora and --adapter are two kinds of adapter: pick one"),
                           (("--adapter", "--set", "freeze=mlp"), "--adapter already freezes the base")]:  # fmt: skip
        assert main(_sft_args(base_run, chats, tmp_path / "x", *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_resuming_a_checkpoint_written_before_adapters_existed(base_run, chats, tmp_path):
    out = tmp_path / "old"
    stop_after_one = ("--set", "max_seconds=1e-9")
    assert main(_sft_args(base_run, chats, out, "--max-steps", "2", "--set", "samples=0", *stop_after_one)) == 0
    meta_path = ckpt.resolve_checkpoint(out) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("adapter", "adapter_size"):
        del meta["train_config"][key]
    meta_path.write_text(json.dumps(meta))
    assert main(_sft_args(base_run, chats, out, "--max-steps", "2", "--set", "samples=0")) == 0
    assert ckpt.read_meta(ckpt.resolve_checkpoint(out))["step"] == 2


# ----------------------------------------------------------------------------- the alignment stages


def _no_reference_copy(obj, memo=None):
    raise AssertionError("an --adapter run made a reference copy of the model (its adapters off are the reference)")


def test_dpo_with_adapters_keeps_no_reference_copy_and_starts_at_log_2(base_run, style_pairs, tmp_path, monkeypatch):
    from lmforge.align import dpo

    monkeypatch.setattr(dpo, "copy", types.SimpleNamespace(deepcopy=_no_reference_copy))
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(out), "--adapter",
                 "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--set", "adapter_size=8",
                 "--set", "log_every=1", "--set", "eval_every=3"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # Step 1: the policy is the base (up = 0), the reference the base (adapters off): loss -log sigmoid(0) = log 2.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["reward_margin"] == 0.0
    assert steps[-1]["reward_margin"] > 0  # the adapters moved the policy away from its reference
    evals = [r for r in records if "val_reward_margin" in r]
    assert evals[0]["val_reward_margin"] == 0.0 and evals[-1]["val_reward_margin"] != 0.0
    assert ckpt.read_meta(ckpt.resolve_checkpoint(out))["adapter"]["kind"] == "bottleneck"


def test_grpo_with_adapters_samples_through_them_and_starts_at_zero_kl(base_run, tmp_path, toy_task, monkeypatch):
    from lmforge.align import grpo as grpo_module
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.config import resolve

    monkeypatch.setattr(grpo_module, "copy", types.SimpleNamespace(deepcopy=_no_reference_copy))
    sets = {"max_steps": 2, "batch_size": 2, "group_size": 4, "max_new_tokens": 8, "eval_prompts": 0,
            "train_prompts": 50, "log_every": 1, "lr": 1e-2, "warmup_steps": 1, "adapter": True,
            "adapter_size": 8}  # fmt: skip
    grpo(resolve(GrpoConfig, {}, {"base": str(base_run), "task": toy_task, "out": str(tmp_path / "g")}, sets))
    steps = [r for r in map(json.loads, (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 2 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)
