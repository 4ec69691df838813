"""`lmforge bench`: the timing helper and the JSON line it prints, on a tiny shape (seconds, CPU)."""

import argparse
import json
import math

import torch

from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train import bench


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "16", "--vocab-size", "64"]


def test_bench_train_prints_one_json_line(capsys):
    args = _parse(
        ["bench", "train", *TINY, "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json"]
    )
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "train"
    assert result["tokens_per_s"] > 0
    assert result["params"] > 0 and result["flops_per_token"] > 0
    assert result["mfu"] is None  # no peak FLOP/s table entry for CPUs
    assert result["bf16"] is False and result["memory_peak_bytes"] is None  # fp32 on CPU; a peak on CUDA only
    assert result["memory_predicted_bytes"] > 16 * result["params"]  # weights, grads, AdamW and activations


def test_time_train_steps_trains_and_returns_tokens_per_s():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, max_seq_len=16))
    idx = torch.randint(0, 64, (2, 16))
    before = model.embed_tokens.weight.detach().clone()
    tps = bench.time_train_steps(model, idx, torch.roll(idx, -1, 1), steps=2, warmup=1)
    assert tps > 0 and math.isfinite(tps)
    assert not torch.equal(before, model.embed_tokens.weight)  # the optimizer stepped
    assert math.isnan(bench.time_train_steps(model, idx, idx, steps=0, warmup=1))


def test_bench_generate_prints_one_json_line(capsys):
    argv = ["bench", "generate", *TINY, "--prompt-len", "4", "--new-tokens", "3", "--warmup", "0", "--json"]
    args = _parse(argv)
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bench"] == "generate" and result["tokens_per_s"] > 0 and result["fused"] is True
    args = _parse([*argv, "--no-fused"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["fused"] is False
