"""Which fp32 product layout a batched decode step should use on this CPU: oneDNN packed, MKL, or lmforge's rule.

    python benchmarks/decode_products.py --model /tmp/smol --model runs/demo/sft --rows 1,4,16

For each model, every projection of a decode step (each layer's fused q/k/v, o, fused gate/up, down, then the
output head) in the step's order, `--rows` activation rows each, through:
- onednn: every weight packed by oneDNN for 16 rows (`mkldnn._reorder_linear_weight`, `_linear_pointwise`);
- mkl: every weight as W^T (in, out) contiguous, `x @ W^T` (MKL);
- rule: what the fused decode step does under the process's matmul backend (lmforge/serve/generate.py `_Proj`):
  under MKL (Intel), packed only for weights of at least `PACK_MIN` elements; under oneDNN, every weight packed.
Interleaved rounds (best of 3 calls each), medians in ms per step. The products only: the rest of the step
(norms, attention, Python) is in benchmarks/decode_breakdown.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model.matmul import cpu_matmul
from lmforge.serve.generate import PACK_MIN
from lmforge.train.checkpoint import load_for_inference


def weights(model) -> list[torch.Tensor]:
    out = []
    for block in model.layers:
        a, mlp = block.self_attn, block.mlp
        out += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight]
        out += [torch.cat([m.weight for m in mlp.in_projs]), mlp.down_proj.weight]
    return [w.detach() for w in out] + [model.lm_head.weight.detach()]


@torch.inference_mode()
def compare(path: str, rows: int, rounds: int) -> dict[str, float]:
    ws = weights(load_for_inference(path)[0])
    xs = [torch.randn(rows, w.shape[1]) for w in ws]
    wts = [w.t().contiguous() for w in ws]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
    big = [cpu_matmul() == "onednn" or w.numel() >= PACK_MIN for w in ws]

    def onednn(x, i):
        return torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")

    fns = {
        "onednn": lambda: [onednn(x, i) for i, x in enumerate(xs)],
        "mkl": lambda: [x @ wt for x, wt in zip(xs, wts)],
        "rule": lambda: [onednn(x, i) if big[i] else x @ wts[i] for i, x in enumerate(xs)],
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[k].append(best * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(f"matmul backend: {cpu_matmul()}, threads {torch.get_num_threads()}, PACK_MIN {PACK_MIN}")
    for path in a.model:
        for rows in map(int, a.rows.split(",")):
            med = compare(path, rows, a.rounds)
            cells = "  ".join(f"{k} {v:.2f}" for k, v in med.items())
            print(f"{path} rows {rows}: {cells}  (rule / onednn {med['onednn'] / med['rule']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
