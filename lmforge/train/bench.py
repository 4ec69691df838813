"""Speed of one training step and of generation, for any model shape: `lmforge bench`.

    lmforge bench train --json                      # the tiny shape: L=4, d=256, T=256, V=8192, batch 16
    lmforge bench train --compile                   # what the training loop can switch on
    lmforge bench train --n-layer 12 --d-model 768 --n-head 12 --seq-len 1024 --batch-size 16 --dtype bfloat16
    lmforge bench generate --batch-size 4 --json    # 128-token prompts, 256 new tokens, greedy
    lmforge bench generate --no-fused               # without the fused decode step (the model's own forward)

Prints one JSON line (with --json) holding tokens_per_s, params, flops_per_token and mfu
(achieved FLOP/s over the device's dense bf16 peak; null on CPU and unknown devices); a training
bench also holds memory_predicted_bytes (lmforge/train/memory.py) and, on CUDA, memory_peak_bytes
(the allocator's peak), so the prediction can be checked on the GPU at hand.
`time_train_steps` is also what benchmarks/train_speed.py uses to compare against nanoGPT
and transformers side by side.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from lmforge.model import cpu_kernels
from lmforge.model.sizes import count_params, flops_per_token
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.common import peak_flops, pick_device, tune_cpu_allocator
from lmforge.train.memory import train_memory
from lmforge.train.optim import make_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_train_steps(model, idx, targets, steps: int, warmup: int, optimizer=None, bf16: bool = False) -> float:
    """Tokens per second of a full training step (forward, backward, AdamW step), median over `steps`.

    `model(idx, targets)` must return `(logits, loss)`. Pass `optimizer` to keep its state
    across calls (benchmarks interleave models round by round); by default a plain AdamW.
    The first `warmup` steps are not timed (allocator warm-up, lazy init, torch.compile);
    `steps=0` only warms up and returns nan. `bf16`: the forward under bf16 autocast, as training on a GPU runs.
    """
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    device = idx.device

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return idx.numel() / statistics.median(times) if times else float("nan")


def time_generate(model, prompts: list[list[int]], max_new_tokens: int, fused: bool = True) -> float:
    """New tokens per second of greedy `lmforge.serve.generate.generate` over all rows (`fused`: its fast decode step)."""
    from lmforge.serve.generate import generate

    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens, temperature=0, fused=fused)
    _sync(device)
    return sum(len(o) for o in out) / (time.perf_counter() - t0)


def _config(args, max_seq_len: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab_size, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
        n_kv_head=args.n_kv_head, max_seq_len=max_seq_len,
    ).validate()  # fmt: skip


def bench_train(args) -> dict:
    device = pick_device(args.device)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")  # as `lmforge pretrain`
    torch.manual_seed(0)
    cfg = _config(args, args.seq_len)
    model = Transformer(cfg).to(device)
    params = count_params(model)["total"]
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), device)  # the training loop's own optimizer
    if device.type == "cpu":
        tune_cpu_allocator()  # as `lmforge pretrain` does
    step_model = torch.compile(model) if args.compile else model
    idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)
    targets = torch.roll(idx, -1, dims=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if args.compile:  # compile outside the timed steps; report its cost separately
        time_train_steps(step_model, idx, targets, steps=0, warmup=1, optimizer=optimizer, bf16=bf16)
    compile_s = time.perf_counter() - t0 if args.compile else None
    tps = time_train_steps(step_model, idx, targets, steps=args.steps, warmup=args.warmup, optimizer=optimizer,
                           bf16=bf16)  # fmt: skip
    fpt = flops_per_token(cfg, args.seq_len)
    predicted = train_memory(cfg, batch_size=args.batch_size, seq_len=args.seq_len, bf16=bf16)["total"]
    # The allocator's peak next to the prediction (CUDA only: on a CPU the process's RSS holds much else besides).
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return _result("train", args, device, tps, params, fpt, compile_s=compile_s, bf16=bf16,
                   memory_predicted_bytes=predicted, memory_peak_bytes=peak)  # fmt: skip


def bench_generate(args) -> dict:
    device = pick_device(args.device)
    torch.manual_seed(0)
    cfg = _config(args, args.prompt_len + args.new_tokens)
    model = Transformer(cfg).to(device)
    params = count_params(model)["total"]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch_size, args.prompt_len), generator=gen).tolist()
    for _ in range(args.warmup):
        time_generate(model, prompts, min(8, args.new_tokens), fused=not args.no_fused)
    tps = time_generate(model, prompts, args.new_tokens, fused=not args.no_fused)
    fpt = flops_per_token(cfg, args.prompt_len + args.new_tokens) / 3  # forward only: a third of training's
    extra = {"cpu_kernels": cpu_kernels.status()} if device.type == "cpu" else {}  # built, or why torch's ops run
    return _result("generate", args, device, tps, params, fpt, fused=not args.no_fused, **extra)


def _result(kind, args, device, tps, params, fpt, **extra) -> dict:
    peak = peak_flops(device)
    return {
        "bench": kind,
        "device": str(device),
        "shape": {k: getattr(args, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "vocab_size")}
        | {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "compile": bool(getattr(args, "compile", False)),
        "tokens_per_s": tps,
        "params": params,
        "flops_per_token": fpt,
        "mfu": tps * fpt / peak if peak else None,
        **extra,
    }


def _run(args) -> int:
    result = bench_train(args) if args.bench == "train" else bench_generate(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['bench']}: {result['tokens_per_s']:,.0f} tokens/s, {result['params']:,} params, mfu {result['mfu']}"
        )
        if "cpu_kernels" in result:
            print(f"lmforge's CPU kernels: {result['cpu_kernels']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time a training step or generation")
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, help_text in (("train", "tokens/s of forward+backward+AdamW"), ("generate", "new tokens/s, greedy")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--n-layer", type=int, default=4)
        q.add_argument("--d-model", type=int, default=256)
        q.add_argument("--n-head", type=int, default=4)
        q.add_argument("--n-kv-head", type=int, default=None, help="default: n_head (MHA)")
        q.add_argument("--seq-len", type=int, default=256, help="training sequence length")
        q.add_argument("--vocab-size", type=int, default=8192)
        q.add_argument("--batch-size", type=int, default=16 if name == "train" else 1)
        q.add_argument("--steps", type=int, default=10, help="timed steps (train)")
        q.add_argument("--warmup", type=int, default=2, help="untimed steps or runs first")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
        q.add_argument("--json", action="store_true", help="print one JSON line")
        if name == "train":
            q.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
            q.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                           help="auto: bf16 autocast on CUDA, fp32 elsewhere (as lmforge pretrain)")  # fmt: skip
        else:
            q.add_argument("--prompt-len", type=int, default=128)
            q.add_argument("--new-tokens", type=int, default=256)
            q.add_argument("--no-fused", action="store_true", help="run the model's own forward for every decode step")
        q.set_defaults(func=_run)
