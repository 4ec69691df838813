"""Training memory prediction (lmforge/train/memory.py) against what autograd really keeps, `lmforge params`'
memory lines, and the packaged cluster recipes (gpt2-124m, llama-1b-fsdp) resolving to valid pretraining configs."""

import json
import subprocess
import sys

import pytest
import torch

from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.memory import measure_activations, train_memory


def saved_bytes_of_full_model(cfg: ModelConfig, batch: int, seq: int, bf16: bool, checkpointing: bool) -> int:
    """The reference: every saved tensor of one forward of the whole model, counted once per storage."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.checkpointing = checkpointing
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, bf16):
        model(idx, idx)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize(
    "shape",
    [
        {"n_head": 8, "n_kv_head": 2},  # rope, swiglu, rmsnorm, GQA
        {"n_head": 4, "pos_encoding": "learned", "mlp": "gelu", "norm": "layernorm"},  # GPT-2's kind
    ],
    ids=["llama-like", "gpt2-like"],
)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["keep", "recompute"])
def test_activation_prediction_matches_what_autograd_keeps(shape, bf16, checkpointing):
    # Another vocabulary, depth and batch than the measurement's (64 rows, 1-2 blocks, one row of 16-32 tokens).
    cfg = ModelConfig(vocab_size=600, n_layer=3, d_model=96, max_seq_len=128, **shape)
    predicted = measure_activations(cfg, bf16, checkpointing).total(3 * 80, cfg.n_layer)
    real = saved_bytes_of_full_model(cfg, 3, 80, bf16, checkpointing)
    assert predicted == pytest.approx(real, rel=0.02)


def test_train_memory_parts_follow_parallelism_and_optimizer():
    cfg = ModelConfig(vocab_size=512, n_layer=2, d_model=64, n_head=4, max_seq_len=64)
    ddp = train_memory(cfg, batch_size=2, seq_len=32, world_size=4)
    fsdp = train_memory(cfg, batch_size=2, seq_len=32, world_size=4, parallel="fsdp")
    muon = train_memory(cfg, batch_size=2, seq_len=32, optimizer="muon")
    P = ddp["params"]
    assert ddp["weights"] == ddp["grads"] == 4 * P and ddp["optimizer"] == 8 * P and ddp["gathered_block"] == 0
    assert fsdp["weights"] == P and fsdp["optimizer"] == 2 * P and 0 < fsdp["gathered_block"] < 4 * P
    assert fsdp["activations"] == ddp["activations"]  # per process: the same micro-batch
    assert 4 * P < muon["optimizer"] < 8 * P  # one moment for the blocks' matrices, two for the rest
    for mem in (ddp, fsdp, muon):
        assert mem["total"] == sum(mem[k] for k in ("weights", "grads", "optimizer", "gathered_block",
                                                    "activations", "loss_chunk"))  # fmt: skip
    longer = train_memory(cfg, batch_size=4, seq_len=32, world_size=4)
    assert longer["activations"] > 1.9 * ddp["activations"] - 1e6  # linear in tokens (plus fixed bytes)
    ckpt = train_memory(cfg, batch_size=4, seq_len=32, checkpointing=True)
    assert ckpt["activations"] < longer["activations"]


@pytest.mark.parametrize("recipe", ["gpt2-124m", "llama-1b-fsdp"])
def test_cluster_recipes_resolve_and_predict_memory_per_gpu(recipe):
    from lmforge.config import load_yaml, recipe_path
    from lmforge.train.pretrain import resolve_train_config

    cfg = resolve_train_config(load_yaml(recipe_path(recipe)), {}, {})
    assert cfg.compile and cfg.dtype == "bfloat16" and cfg.seq_len == cfg.model.max_seq_len
    gpus = 8
    assert cfg.batch_size * cfg.grad_accum * cfg.seq_len * gpus in (524_288, 1_048_576)  # the header's tokens a step
    if recipe == "llama-1b-fsdp":
        assert cfg.parallel == "fsdp" and cfg.activation_checkpointing == "on"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "params", "--config", recipe, "--gpus", str(gpus), "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    mem = json.loads(proc.stdout)["memory"]
    assert mem["gpus"] == gpus and mem["activation_checkpointing"] is True
    assert 2 * 2**30 < mem["total"] < 10 * 2**30  # the header's figure (3.5 / 6.8 GiB) within an 80 GB GPU


def test_pipeline_runner_points_a_pretraining_config_to_pretrain(capsys):
    from lmforge.cli import main

    assert main(["run", "--recipe", "gpt2-124m"]) == 2
    assert "lmforge pretrain --config gpt2-124m" in capsys.readouterr().err
