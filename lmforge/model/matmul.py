"""fp32 matrix products on CPU through oneDNN instead of MKL: the linear layers and the output head.

    from lmforge.model.matmul import Linear, linear, mm_nt, mm_nn, mm_tn
    layer = Linear(256, 768, bias=False)     # an nn.Linear (same parameters, state dict, init)
    y = linear(x, weight, bias)              # F.linear, same math; oneDNN on CPU fp32
    mm_nt(a, b), mm_nn(a, b), mm_tn(a, b)    # a @ b.T, a @ b, a.T @ b

    LMFORGE_CPU_MATMUL=aten lmforge pretrain ...   # torch's own kernels everywhere (or set_cpu_matmul("aten"))
    LMFORGE_CPU_MATMUL=onednn ...                  # oneDNN on any CPU (the default except on Intel: default_backend)

Why: PyTorch sends fp32 CPU matrix products to MKL's sgemm. On AMD CPUs MKL does not use its
AVX-512 kernels: on a 2-core AMD EPYC with AVX-512 it gave ~200 GFLOP/s at the tiny model's
shapes, while oneDNN, which every PyTorch CPU build also ships (inductor calls it for frozen
inference graphs), gave 400-500 GFLOP/s on the same shapes, and a whole tiny-model training
step ran ~1.6x faster (BENCHMARKS.md, "Training speed, CPU"). This is still fp32: no reduced
precision, results agree with MKL's to fp32 rounding (tests/test_matmul.py). On Intel CPUs MKL does use
AVX-512 and was the faster (2-core Xeon: oneDNN 0.87x of MKL for a training step), so there the default stays
torch's own products (default_backend).

oneDNN's linear computes x @ w.T; the backward products are the same op on transposed views,
arranged so that the larger of the two output dimensions is oneDNN's "output channels" (up to
1.7x faster for the weight gradient). Under torch.compile the products are an opaque custom op
(`lmforge::onednn_linear`), so inductor fuses the elementwise work around them. Anything else
(GPU, bf16, autocast, empty tensors, a PyTorch without the op) uses torch's ops, so behaviour off
the CPU fp32 path is exactly torch's. The op is private (`torch.ops.mkldnn._linear_pointwise`): when a PyTorch
version drops it, this falls back rather than failing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError

BACKENDS = ("onednn", "aten")
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def default_backend(cpuinfo: str | None = None) -> str:
    """oneDNN, except on Intel CPUs, where MKL uses its AVX-512 kernels and torch's own products were the faster:
    a tiny-model training step 1.15x faster through MKL on a 2-core Xeon (AMX, AVX-512), 1.0-1.6x slower on AMD
    EPYCs (BENCHMARKS.md, "Training speed, CPU"). By the CPU's vendor, so each machine always takes the same path."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(4096)
        except OSError:
            cpuinfo = ""
    return "aten" if "GenuineIntel" in cpuinfo else "onednn"


_backend = os.environ.get("LMFORGE_CPU_MATMUL") or default_backend()
if _backend not in BACKENDS:
    raise LmforgeError(f"LMFORGE_CPU_MATMUL must be one of {', '.join(BACKENDS)}, got {_backend!r}")


def set_cpu_matmul(backend: str) -> str:
    """Pick the fp32 CPU matmul backend for this process ("onednn" or "aten"); returns the previous one."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"cpu matmul backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    previous, _backend = _backend, backend
    return previous


def cpu_matmul() -> str:
    """The fp32 CPU matmul backend this process uses ("onednn" or "aten")."""
    return _backend


def onednn_applies(*tensors: torch.Tensor) -> bool:
    """True when the products of these tensors run through oneDNN: CPU, fp32, no autocast."""
    if _backend != "onednn" or _LINEAR is None:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in tensors)


_OP = None  # `lmforge::onednn_linear`, for torch.compile: registered when the first `Linear` is built


def register_compiled_op():
    """Register `lmforge::onednn_linear` (once): under torch.compile the products are this opaque op with a shape
    rule, so inductor fuses the elementwise work around it. Called when a `Linear` is built, so importing
    this module registers nothing, and the op exists before any graph is traced."""
    global _OP
    if _OP is not None or _LINEAR is None:
        return

    @torch.library.custom_op("lmforge::onednn_linear", mutates_args=())
    def op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return _LINEAR(x, w, b, "none", [], "")

    @op.register_fake
    def _(x, w, b):
        return x.new_empty(x.shape[0], w.shape[0])

    _OP = op


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (m, k) @ w (n, k).T + b. Under torch.compile an opaque custom op (inductor's own lowering
    of the oneDNN op wants prepacked weights); in eager the op itself (no custom-op dispatch cost)."""
    if torch.compiler.is_compiling():
        if _OP is None:  # traced before any Linear was built (a bare loss under compile): torch's own product
            return F.linear(x, w, b)
        return _OP(x, w, b)
    return _LINEAR(x, w, b, "none", [], "")


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a (m, k) and b (n, k)."""
    return _onednn(a, b) if onednn_applies(a, b) else a @ b.t()


def mm_nn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a (m, k) and b (k, n)."""
    return _onednn(a, b.t()) if onednn_applies(a, b) else a @ b


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b for 2-D a (m, n) and b (m, k): the weight gradient of a linear layer (a = dY, b = X)."""
    if not onednn_applies(a, b):
        return a.t() @ b
    if a.shape[1] >= b.shape[1]:  # the wider side as oneDNN's output channels: (b.T @ a).T
        return _onednn(b.t(), a.t()).t()
    return _onednn(a.t(), b.t())


class _Linear(torch.autograd.Function):
    """y = x @ w.T + b with all three products (forward, input and weight gradients) through oneDNN."""

    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(x2, weight)
        return _onednn(x2, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = mm_nn(grad, weight) if need_x else None
        grad_w = mm_tn(grad, x2) if need_w else None  # skipped for frozen weights (LoRA)
        grad_b = grad.sum(0) if need_b else None  # False when there is no bias
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x of any leading shape; through oneDNN on CPU fp32."""
    args = (x, weight) if bias is None else (x, weight, bias)
    if not onednn_applies(*args):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        y = _Linear.apply(x2, weight, bias)
    else:
        y = _onednn(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` above (parameters, names and init are nn.Linear's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        register_compiled_op()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
