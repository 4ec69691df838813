"""The fused decode step with lmforge's C kernels for RMSNorm, RoPE and attention against the same step on torch's ops.

    python benchmarks/decode_kernels.py --model /tmp/smol --model /tmp/smol-int8 --rounds 9

Per model: two FusedDecoders at batch 1 (lmforge/serve/generate.py), one as generation builds it (cpu_kernels.c's
rms_norm, rope and decode_attention where they are built), one with F.rms_norm, apply_rope and SDPA put back; the
matrix products are the same in both. Logits of one step compared (max abs difference), then ms per step at a
100-token context, `--rounds` interleaved rounds of 10 steps, medians and the ratio. Then greedy picks: torch.argmax
against cpu_kernels.argmax on 16 rows of logits at each model's vocabulary (the serving engine's temperature-0 rows, the
scorer's is-greedy check), the same indices, microseconds a call.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.model import cpu_kernels
from lmforge.model.transformer import KVCache, apply_rope
from lmforge.serve.generate import FusedDecoder
from lmforge.train.checkpoint import load_for_inference


def torch_norm(module):
    return functools.partial(F.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps)


@torch.inference_mode()
def compare(path: str, rounds: int) -> None:
    model = load_for_inference(path)[0].eval()
    ours, plain = FusedDecoder(model, 1), FusedDecoder(model, 1)
    plain.c_kernels, plain.rope = False, apply_rope
    plain.layers = [(b, torch_norm(b.input_layernorm), torch_norm(b.post_attention_layernorm), *rest)
                    for b, _, _, *rest in plain.layers]  # fmt: skip
    plain.norm = torch_norm(model.norm)
    tok = torch.tensor([42])
    caches = [KVCache(model.cfg, 1, 128) for _ in range(2)]
    for c in caches:
        model(torch.tensor([list(range(5, 105))]), cache=c)
    diff = (ours(tok, caches[0]) - plain(tok, caches[1])).abs().max().item()
    times: dict[str, list[float]] = {"torch ops": [], "C kernels": []}
    for _ in range(rounds):
        for name, dec, cache in (("torch ops", plain, caches[1]), ("C kernels", ours, caches[0])):
            cache.length = 100
            dec(tok, cache)
            t0 = time.perf_counter()
            for _ in range(10):
                dec(tok, cache)
            times[name].append((time.perf_counter() - t0) / 10 * 1e3)
            cache.length = 100
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{path}: logits max abs difference {diff:.2e}")
    for k, v in times.items():
        print(f"  {k}: {med[k]:.2f} ms a step (rounds {[round(x, 1) for x in v]})")
    ratios = [a / b for a, b in zip(times["torch ops"], times["C kernels"])]
    print(
        f"  C kernels {med['torch ops'] / med['C kernels']:.2f}x faster (per round {min(ratios):.2f}-{max(ratios):.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    print(f"kernels: {cpu_kernels.status()}, threads {torch.get_num_threads()}")
    for path in a.model:
        compare(path, a.rounds)
        argmax(load_for_inference(path)[0].cfg.vocab_size, a.rounds)


def argmax(vocab: int, rounds: int, rows: int = 16, calls: int = 200) -> None:
    x = torch.randn(rows, vocab)
    assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1))
    times: dict[str, list[float]] = {"torch.argmax": [], "lmf_argmax": []}
    for _ in range(rounds):
        for name, f in (("torch.argmax", lambda: x.argmax(-1)), ("lmf_argmax", lambda: cpu_kernels.argmax(x))):
            t = time.perf_counter()
            for _ in range(calls):
                f()
            times[name].append((time.perf_counter() - t) / calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"  argmax of ({rows}, {vocab}) logits: torch {med['torch.argmax']:.1f} us, lmforge {med['lmf_argmax']:.1f} us, "
        f"{med['torch.argmax'] / med['lmf_argmax']:.1f}x"
    )


if __name__ == "__main__":
    main()
