"""Where a batch-1 decode step's time goes on CPU: the matrix products alone vs the whole step.

    python benchmarks/decode_breakdown.py --model /tmp/smol --model /tmp/smol-int8     # fp32 and `lmforge quantize`d

Part 1, for the model's projection shapes: every layer's weights as distinct tensors (so they stream from
DRAM, as in decoding, not from cache), one row times each, fp32 (`x @ W^T` in the layout the decode step
uses) and int8 (ATen's `_weight_int8pack_mm`, bf16 activation, and lmforge's own kernel, lmforge/model/cpu_kernels.c,
which int8 models run where it builds): ms per token and GB/s; then all fp32 products
in the step's own order (on a CPU whose cache holds one shape's 30 weights, the per-shape figures are low). Part 2, per model:
tok/s of `generate` at batch 1 (the decode steps only: the time between the first and the last streamed
token) and the top operators of 32 decode steps by torch.profiler. The difference between part 2's
ms per token and part 1's sum is the per-op overhead (norms, RoPE, attention, casts, Python).
Part 3, per quantized model: the fused decode step with its int8/int4 kernels called bare (as generation runs
them) against the same step through QuantLinear.forward, `--rounds` interleaved rounds of 30 steps, median ms
per step of each, and whether the logits are bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model import cpu_kernels
from lmforge.model.transformer import KVCache
from lmforge.serve.generate import FusedDecoder, generate
from lmforge.train.checkpoint import load_for_inference


def best_ms(fn, rounds: int = 5, n: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def products(cfg) -> None:
    hd = cfg.head_dim
    shapes = [("qkv", (cfg.n_head + 2 * cfg.n_kv_head) * hd, cfg.d_model, cfg.n_layer),
              ("o", cfg.d_model, cfg.n_head * hd, cfg.n_layer), ("gate+up", 2 * cfg.d_ff, cfg.d_model, cfg.n_layer),
              ("down", cfg.d_model, cfg.d_ff, cfg.n_layer), ("head", cfg.vocab_size, cfg.d_model, 1)]  # fmt: skip
    own = cpu_kernels.loaded() is not None
    total = {"fp32": 0.0, "int8": 0.0, "own": 0.0}
    kept = {}
    for name, N, K, L in shapes:
        qs = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(L)]
        wts = kept[name] = [q.float().t().contiguous() for q in qs]
        scales, xb = torch.rand(N).bfloat16(), torch.randn(1, K).bfloat16()
        x = xb.float()
        fp32 = best_ms(lambda: [x @ w for w in wts])  # noqa: B023 (called right here)
        int8 = best_ms(lambda: [torch.ops.aten._weight_int8pack_mm(xb, q, scales) for q in qs])  # noqa: B023
        fs = scales.float()
        mine = best_ms(lambda: [cpu_kernels.int8_gemm(x, q, fs) for q in qs]) if own else float("nan")  # noqa: B023
        total["fp32"] += fp32
        total["int8"] += int8
        total["own"] += mine
        print(f"  {name:8s} {N}x{K} x{L}: fp32 {fp32:.2f} ms ({N * K * L * 4 / fp32 / 1e6:.1f} GB/s), "
              f"int8 ATen {int8:.2f} ms ({N * K * L / int8 / 1e6:.1f} GB/s), "
              f"int8 lmforge {mine:.2f} ms ({N * K * L / mine / 1e6:.1f} GB/s)")  # fmt: skip
    print(f"  products per token: fp32 {total['fp32']:.1f} ms, int8 ATen {total['int8']:.1f} ms, "
          f"int8 lmforge {total['own']:.1f} ms ({cpu_kernels.status()})")  # fmt: skip
    # The same fp32 products in the decode step's own order (layer by layer, then the head): nothing of one shape
    # is still cached when its turn comes again, as in a real step.
    x, h = torch.randn(1, cfg.d_model), torch.randn(1, cfg.d_ff)
    layers = list(zip(kept["qkv"], kept["o"], kept["gate+up"], kept["down"]))
    in_order = best_ms(lambda: ([(x @ a, x @ b, x @ c, h @ d) for a, b, c, d in layers], x @ kept["head"][0]))
    print(f"  fp32 products in the step's order: {in_order:.1f} ms a token")


def whole_step(path: str, new: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = load_for_inference(path)[0]
    prompt = [list(range(1, 9))]
    generate(model, prompt, 4, temperature=0)
    stamps: list[float] = []
    generate(model, prompt, new, temperature=0, stop_ids=(), stream=lambda row, tok: stamps.append(time.perf_counter()))
    ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3
    print(f"{path}: {1e3 / ms:.1f} tok/s at batch 1 ({ms:.1f} ms a token)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, prompt, 32, temperature=0, stop_ids=())
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


@torch.inference_mode()
def bare_kernels(path: str, rounds: int) -> None:
    model = load_for_inference(path)[0].eval()
    dec = FusedDecoder(model, 1)
    projs = [p for layer in dec.layers for p in layer[3:7]] + [dec.head]
    kernels = [p.kernel for p in projs]
    if not any(kernels):
        return
    cache = KVCache(model.cfg, 1, 200)
    model(torch.arange(1, 101)[None] % model.cfg.vocab_size, cache=cache, last_only=True)
    tok, times, logits = torch.tensor([5]), {"bare": [], "QuantLinear.forward": []}, {}
    for _ in range(rounds):
        for name, ms in times.items():
            for p, k in zip(projs, kernels):
                p.kernel = k if name == "bare" else None
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                logits[name] = dec(tok, cache)
                ts.append(time.perf_counter() - t0)
            cache.length = 100
            ms.append(statistics.median(ts) * 1e3)
    same = torch.equal(*logits.values())
    print(f"{path}: decode step, kernels bare {statistics.median(times['bare']):.2f} ms, through QuantLinear.forward "
          f"{statistics.median(times['QuantLinear.forward']):.2f} ms (medians of {rounds} rounds); per round "
          f"{[round(b / a, 3) for a, b in zip(*times.values())]}x; logits bit-identical: {same}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeat: fp32, int8, ...)")
    ap.add_argument("--new", type=int, default=128, help="new tokens for the tok/s figure")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of part 3")
    args = ap.parse_args()
    cfg = load_for_inference(args.model[0])[0].cfg
    print(f"matrix products of one token, {torch.get_num_threads()} threads (weights from DRAM):")
    products(cfg)
    for path in args.model:
        whole_step(path, args.new)
    for path in args.model:
        bare_kernels(path, args.rounds)


if __name__ == "__main__":
    main()
