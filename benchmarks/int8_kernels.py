"""Which CPU kernel multiplies one token by int8 weights fastest? The candidates torch offers, on decode's shapes.

    python benchmarks/int8_kernels.py                          # SmolLM2-135M's projections, 30 layers, 2 threads
    python benchmarks/int8_kernels.py --no-inductor            # skip inductor's (slow to compile) candidate

For each projection shape (out x in), `--layers` distinct int8 weights (so they stream from memory as in
decoding, not from cache), one row times each, median of 9 timings of the whole set, ms per token:
- lmforge: lmforge's own kernel (lmforge/model/cpu_kernels.c: bf16-rounded activations, per-row scales, weights
  prefetched far ahead): what `lmforge quantize` int8 runs where it builds (lmforge/model/quant.py);
- aten: `_weight_int8pack_mm` (bf16 activations, per-row scales): what int8 runs where lmforge's kernel does not build;
- fbgemm: `quantized::linear_dynamic` (activations quantized per tensor on the fly: W8A8, one scale per call,
  so a row's result depends on its batch);
- int_mm: `torch._int_mm` on int8 activations (the product alone; quantizing the activations not counted);
- inductor: `torch.compile(mode="max-autotune")` with freezing on the linear of `w.to(bf16)` times the scales
  (inductor's weight-only int8 pattern).
Then lmforge and aten on every weight of a decode step in the step's order (each layer's four, then the output
head, 49152 x 576: ~135 MB, more than the per-shape sets, as decoding streams them), interleaved rounds, medians.
Last, rows per product (`--rows`): one 3072 x 576 weight (ten copies) times 1-512 activation rows through lmforge's
kernel, ATen's and the dequantized fp32 product QuantLinear uses past the kernels' row limit: where the crossover is.
The fastest CPU engine users know (llama.cpp's q8_0) is in benchmarks/gguf_llamacpp.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model import cpu_kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate+up": (3072, 576), "down": (576, 1536)}


def median_s(fn, n: int = 9) -> float:
    fn()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]


class WeightOnly(torch.nn.Module):
    """Every layer's linear as inductor's weight-only int8 pattern matches it."""

    def __init__(self, qs: list[torch.Tensor], scales: list[torch.Tensor]):
        super().__init__()
        self.q = torch.nn.ParameterList([torch.nn.Parameter(q, requires_grad=False) for q in qs])
        self.s = torch.nn.ParameterList([torch.nn.Parameter(s, requires_grad=False) for s in scales])

    def forward(self, x):
        return [torch.nn.functional.linear(x, q.to(x.dtype)) * s for q, s in zip(self.q, self.s)]


@torch.no_grad()
def time_shape(o: int, i: int, layers: int, inductor: bool) -> dict[str, float]:
    """Seconds for one row times `layers` distinct (o, i) int8 weights, by each kernel."""
    g = torch.Generator().manual_seed(0)
    qs = [torch.randint(-127, 128, (o, i), dtype=torch.int8, generator=g) for _ in range(layers)]
    scales = [torch.rand(o, generator=g).bfloat16() / 100 for _ in range(layers)]
    x = torch.randn(1, i, generator=g)
    xb, xi = x.bfloat16(), torch.randint(-127, 128, (1, i), dtype=torch.int8, generator=g)
    packed = []
    for q, s in zip(qs, scales):
        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(o, dtype=torch.long), 0)
        packed.append(torch.ops.quantized.linear_prepack(qw, None))
    own = cpu_kernels.loaded() is not None
    fs = [s.float() for s in scales]
    row = {
        **({"lmforge": median_s(lambda: [cpu_kernels.int8_gemm(x, q, s) for q, s in zip(qs, fs)])} if own else {}),
        "aten": median_s(lambda: [torch._weight_int8pack_mm(xb, q, s) for q, s in zip(qs, scales)]),
        "fbgemm": median_s(lambda: [torch.ops.quantized.linear_dynamic(x, p) for p in packed]),
        "int_mm": median_s(lambda: [torch._int_mm(xi, q.t()) for q in qs]),
    }
    if inductor:
        compiled = torch.compile(WeightOnly(qs, scales).eval(), mode="max-autotune")
        compiled(xb)
        row["inductor"] = median_s(lambda: compiled(xb))
    return row


@torch.no_grad()
def step_order(layers: int, rounds: int) -> dict[str, list[float]]:
    """ms for one row times every int8 weight of a SmolLM2-shaped decode step, in the step's order, per round."""
    g = torch.Generator().manual_seed(1)
    shapes = [shape for _ in range(layers) for shape in SHAPES.values()] + [(49152, 576)]
    qs = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for shape in shapes]
    scales = [torch.rand(shape[0], generator=g).bfloat16() / 100 for shape in shapes]
    xs = [torch.randn(1, shape[1], generator=g) for shape in shapes]
    fs, xbs = [s.float() for s in scales], [x.bfloat16() for x in xs]
    fns = {"aten": lambda: [torch._weight_int8pack_mm(xb, q, s) for xb, q, s in zip(xbs, qs, scales)]}
    if cpu_kernels.loaded() is not None:
        fns["lmforge"] = lambda: [cpu_kernels.int8_gemm(x, q, s) for x, q, s in zip(xs, qs, fs)]
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(median_s(fn, 5) * 1e3)
    return out


@torch.no_grad()
def rows_sweep(rows: list[int]) -> None:
    """ms per product of one 3072 x 576 int8 weight at each row count: lmforge's kernel, ATen's, dequantized fp32."""
    from lmforge.model.quant import QuantLinear

    g = torch.Generator().manual_seed(2)
    layers = [QuantLinear.from_weight(torch.randn(3072, 576, generator=g), None, "int8") for _ in range(10)]
    fs = [m.scales.to(torch.bfloat16).float() for m in layers]
    for m in rows:
        x = torch.randn(m, 576, generator=g)
        xb = x.bfloat16()
        fns = {
            "dequantized": lambda xb=xb: [torch.nn.functional.linear(xb.float(), q._kernel_weight()) for q in layers],
            "aten": lambda xb=xb: [torch._weight_int8pack_mm(xb, q.qweight, s.bfloat16()) for q, s in zip(layers, fs)],
        }
        if cpu_kernels.loaded() is not None:
            fns["lmforge"] = lambda x=x: [cpu_kernels.int8_gemm(x, q.qweight, s) for q, s in zip(layers, fs)]
        cells = "  ".join(f"{k} {median_s(fn, 5) * 1e3 / 10:.2f}" for k, fn in fns.items())
        print(f"  {m:4d} rows, ms per product: {cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step-order comparison")
    ap.add_argument("--rows", default="1,4,16,32,64,128,192,256,512", help="row counts of the last part ('' skips)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch._inductor.config.freezing = True
    totals: dict[str, float] = {}
    for name, (o, i) in SHAPES.items():
        row = time_shape(o, i, a.layers, not a.no_inductor)
        for k, v in row.items():
            totals[k] = totals.get(k, 0.0) + v
        print(f"{name:8s} {o}x{i} x{a.layers}: " + "  ".join(f"{k} {v * 1e3:.2f} ms ({o * i * a.layers / v / 1e9:.0f} GB/s)" for k, v in row.items()), flush=True)  # fmt: skip
    print("all four projections, ms per token: " + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in totals.items()))
    print(f"lmforge's kernel: {cpu_kernels.status()}")
    order = step_order(a.layers, a.rounds)
    med = {k: statistics.median(v) for k, v in order.items()}
    print("a decode step's int8 products in order, ms (median of rounds): " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))  # fmt: skip
    print("  rounds: " + "  ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in order.items()))
    if "lmforge" in med:
        print(f"  lmforge / aten: {med['aten'] / med['lmforge']:.2f}x faster")
    if a.rows:
        print("one 3072 x 576 weight by rows per product:")
        rows_sweep([int(r) for r in a.rows.split(",")])


if __name__ == "__main__":
    main()
