"""Weight-only quantization: int8 per output row and group-wise int4, the modules that run them, and the file layout.

    lmforge quantize models/smollm2 --method int8 --out models/smollm2-int8     # lmforge/hub/quantize_cmd.py
    lmforge generate models/smollm2-int8 --prompt "The capital of France is"    # loads like any other model

The schemes (pure functions below; tests/test_quant.py checks them by hand):
- int8: symmetric, one scale per output row: s = max|w_row| / 127, q = round(w / s) in [-127, 127], w ~ q * s.
- int4: asymmetric, one scale and one minimum per group of G input columns: s = (max - min) / 15,
  q = round((w - min) / s) in [0, 15], w ~ q * s + min (GPTQ/AWQ's "asymmetric, group size G" without
  their calibration: round to nearest). Stored two per byte, the even column in the low nibble.
  A projection whose input width G does not divide gets the largest of 32/64/128/256 below G that does
  (`layer_scheme`; the demo's d_ff of 704 takes 64 when asked for 128).
The output head and the embedding (one matrix when tied) are int8 under both methods: the head's
error goes straight into every logit, and llama.cpp's q4_0 files keep `output.weight` at higher
precision too. Norms, biases and position tables stay float.

Files hold this portable layout (`X.qweight`, `X.scales`, `X.mins`), not a kernel's private packing,
so any reader can dequantize them; the kernel layout is built at load time.

How it runs on CPU: up to `KERNEL_MAX_ROWS` rows (decoding, small batches) through a kernel that reads the
small weights directly: int8 through lmforge's own (lmforge/model/cpu_kernels.c, built on first use; about 2x
ATen's `_weight_int8pack_mm` at batch 1, which stays the fallback where no C compiler is found), int4 through
ATen's `_weight_int4pack_mm_for_cpu`. They compute with the activation rounded to bf16 (ATen's fp32 paths are
5-20x slower than an fp32 product), as llama.cpp rounds it to 8 bits for its q8_0 dot products. Above that
(prefill, evaluation) the product is compute-bound and the weight is dequantized to float for one fp32
product of the same function. torchao's `Int8WeightOnlyConfig` was measured as the alternative: on CPU it
dequantizes on every call and ran 4-8x slower than fp32 (BENCHMARKS.md, "Quantization"). Off CPU, or where
no kernel applies, the dequantized path runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels
from lmforge.model.matmul import linear

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel takes; K must be a multiple of G
# Above this many rows per product the dequantized fp32 product is faster (measured crossovers, 2-core Xeon,
# benchmarks/int8_kernels.py): ATen's kernels at 16; lmforge's int8 kernel, by its vector width, between 64 and 128
# rows with AVX-512 (a 3072x576 weight at 64 rows: 1.55 against 1.95 ms dequantized; at 128: 3.62 against 2.74) and
# between 16 and 64 with AVX2 (the same build without AVX-512: 0.85 against 1.34 ms at 16 rows, 3.42 against 2.46 at 64).
KERNEL_MAX_ROWS = 16
OWN_KERNEL_MAX_ROWS = {512: 64, 256: 32}
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ----------------------------------------------------------------------------- the math (pure functions)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q int8 (N, K), scales float32 (N,)): symmetric per row, w ~ q * scales[:, None]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q uint8 (N, K) in [0, 15], scales, mins (N, K/G) float16): w ~ q * scale + min per group.

    The scales and minimums are rounded to float16 (what is stored) before q is computed from them.
    """
    N, K = w.shape
    if K % group_size:
        raise LmforgeError(f"int4 group size {group_size} does not divide the input width {K}")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-7).half()  # 1e-7: a constant group, and still nonzero in float16
    lo = lo.half()
    q = torch.round((g - lo.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, lo


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    G = K // scales.shape[1]
    g = q.reshape(N, K // G, G).float() * scales.float()[..., None] + mins.float()[..., None]
    return g.reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, column 2i in the low nibble and 2i+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------- modules


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _max_rows(args) -> int:
    """The row limit of the kernel whose operands `args` are (QuantLinear._kernel_args); 0 where there is none."""
    if args is None:
        return 0
    return OWN_KERNEL_MAX_ROWS[cpu_kernels.isa()] if args[0] == "own" else KERNEL_MAX_ROWS


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored int8 (per row) or int4 (per group); a drop-in for the model's Linear.

    Buffers (what the checkpoint stores): `qweight` (int8 (N, K), or uint8 (N, K/2) for int4), `scales`,
    `mins` (int4 only), `bias` (if any). `weight` is the dequantized matrix (built on each access: for the
    training-style loss path and the fallback product, not for decoding).
    """

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None, bias: bool):
        super().__init__()
        if method not in METHODS:
            raise LmforgeError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        N, K = out_features, in_features
        if method == "int8":
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(N))
        else:
            if group_size not in GROUP_SIZES or K % group_size or K % 2:
                raise LmforgeError(f"int4 group size {group_size} must be one of {GROUP_SIZES} and divide {K}")
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
            # float16 scales and minimums, as llama.cpp's q4 blocks store them: fp32 would add a quarter to the size
            self.register_buffer("scales", torch.ones(N, K // group_size, dtype=torch.float16))
            self.register_buffer("mins", torch.zeros(N, K // group_size, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(N) if bias else None)
        self._kernel = None  # (device, kernel-layout tensors), built on first use: never saved

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, method: str, group_size: int | None = None):
        N, K = weight.shape
        m = cls(K, N, method, group_size, bias is not None)
        with torch.no_grad():
            if method == "int8":
                q, s = quantize_int8(weight)
                m.qweight.copy_(q)
                m.scales.copy_(s)
            else:
                q, s, lo = quantize_int4(weight, group_size)
                m.qweight.copy_(pack_nibbles(q))
                m.scales.copy_(s)
                m.mins.copy_(lo)
            if bias is not None:
                m.bias.copy_(bias.float())
        return m.to(weight.device)

    @classmethod
    def cat(cls, parts: list[QuantLinear]) -> QuantLinear:
        """One module computing the outputs of `parts` (same input, same scheme) side by side: fused q/k/v."""
        first = parts[0]
        if len(parts) == 1:
            return first
        has_bias = any(p.bias is not None for p in parts)
        m = cls(first.in_features, sum(p.out_features for p in parts), first.method, first.group_size, has_bias)
        for name, t in m.named_buffers():
            t.copy_(torch.cat([getattr(p, name) if getattr(p, name) is not None
                               else torch.zeros(p.out_features) for p in parts]))  # fmt: skip
        return m.to(first.qweight.device)

    @property
    def weight(self) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(unpack_nibbles(self.qweight), self.scales, self.mins)

    def _kernel_weight(self) -> torch.Tensor:
        """The float matrix the int kernels multiply by: the stored one, with the scales (and the int4 kernel's
        zero points) rounded to bf16 as those kernels take them."""
        if self.method == "int8":
            return self.qweight.float() * self.scales.to(torch.bfloat16).float()[:, None]
        scales, zeros = self._bf16_scales_zeros()
        N, K = self.out_features, self.in_features
        q = unpack_nibbles(self.qweight).reshape(N, -1, self.group_size).float() - 8
        return (q * scales.float().t()[..., None] + zeros.float().t()[..., None]).reshape(N, K)

    def _bf16_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) (K/G, N) bf16 for `_weight_int4pack_mm_for_cpu`, which computes w = (q - 8) * s + zero."""
        zeros = self.mins.float() + 8 * self.scales.float()
        return self.scales.t().to(torch.bfloat16), zeros.t().to(torch.bfloat16)

    def _kernel_args(self, device):
        """The ATen kernel's operands for this device, built once (None when no kernel applies)."""
        if self._kernel is not None and self._kernel[0] == device:
            return self._kernel[1]
        args = None
        if device.type == "cpu" and self.method == "int8" and cpu_kernels.loaded() is not None:
            args = ("own", self.qweight.contiguous(), self.scales.to(torch.bfloat16).float())
        elif device.type == "cpu" and self.method == "int8" and _has("_weight_int8pack_mm"):
            args = ("aten", self.qweight, self.scales.to(torch.bfloat16))
        elif device.type == "cpu" and self.method == "int4" and _has("_weight_int4pack_mm_for_cpu"):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.qweight).to(torch.int32), 1)
            args = ("aten", packed, torch.stack(self._bf16_scales_zeros(), dim=-1).contiguous())  # (K/G, N, 2)
        self._kernel = (device, args)
        return args

    def _kernel_product(self, x: torch.Tensor, args) -> torch.Tensor:
        """x (rows, in_features) times the weight -> bf16, through the kernel whose operands `args` are: lmforge's
        own int8 one (cpu_kernels.c, which rounds x to bf16 itself) or ATen's (which take x as bf16)."""
        if args[0] == "own":
            return cpu_kernels.int8_gemm(x.float(), *args[1:])
        if self.method == "int8":
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), *args[1:])
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), args[1], self.group_size, args[2])

    def kernel_rows(self, device) -> int:
        """The most rows a product goes through the kernel on this device (more: the dequantized product); 0: none."""
        return _max_rows(self._kernel_args(torch.device(device)))

    def row_kernel(self, device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """x (at most `kernel_rows` rows, in_features) -> the kernel's bf16 product, with nothing around it (no
        reshape, bias or cast back): the decode step's fast path, the same numbers as `forward` before its cast.
        None where no kernel applies or a bias would be needed."""
        args = self._kernel_args(torch.device(device))
        if args is None or self.bias is not None:
            return None
        return lambda x: self._kernel_product(x, args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both paths compute the same function: activations rounded to bf16, the kernel's weight, fp32 sums, a bf16
        # result; so a prompt gets the same tokens whether it is decoded alone, batched or prefilled in chunks.
        x2 = x.reshape(-1, self.in_features)
        args = self._kernel_args(x.device)
        if x2.shape[0] > _max_rows(args):
            args = None
        if args is None:
            y = linear(x2.to(torch.bfloat16).float(), self._kernel_weight()).to(torch.bfloat16)
        else:
            y = self._kernel_product(x2, args)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{g}"


class QuantEmbedding(nn.Module):
    """Token embedding stored int8 per row (`qweight`, `scales`); a row is dequantized when looked up.

    In a tied model it holds the same tensors as the int8 output head (one copy in memory and on disk).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings))

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight[idx].float() * self.scales[idx].unsqueeze(-1)


# ----------------------------------------------------------------------------- whole models


def quant_config(method: str, group_size: int | None) -> dict:
    """What a quantized checkpoint's meta.json says about it (the `quantization` key)."""
    if method not in METHODS:
        raise LmforgeError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise LmforgeError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for int4, got {group_size}")
    return {"method": method, "group_size": group_size if method == "int4" else None, "head": "int8"}


def layer_scheme(in_features: int, method: str, group_size: int | None) -> tuple[str, int | None]:
    """(method, group size) one projection gets: int4 takes the largest kernel group size up to `group_size` that
    divides its input width, and a width no group size divides (not a multiple of 32) stays int8.
    A function of the shapes only, so loading rebuilds the same modules from meta.json."""
    if method != "int4":
        return method, None
    fits = [g for g in GROUP_SIZES if g <= group_size and in_features % g == 0]
    return ("int4", max(fits)) if fits else ("int8", None)


def _projections(model) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, linear) for every projection inside the blocks."""
    return [
        (parent, name, child)
        for block in model.layers
        for parent in block.modules()
        for name, child in parent.named_children()
        if name in _PROJ
    ]


def quantize_model(model, qcfg: dict, *, from_weights: bool = True):
    """Swap the model's projections, head and embedding for quantized modules, in place; returns the model.

    from_weights=True quantizes the current float weights; False builds empty modules for a checkpoint to fill.
    """
    method, group = qcfg["method"], qcfg["group_size"]
    cfg = model.cfg
    with torch.no_grad():
        for parent, name, lin in _projections(model):
            m, g = layer_scheme(lin.in_features, method, group)
            if from_weights:
                q = QuantLinear.from_weight(lin.weight, lin.bias, m, g)
            else:
                q = QuantLinear(lin.in_features, lin.out_features, m, g, lin.bias is not None)
            setattr(parent, name, q)
        head_w = model.lm_head.weight
        if from_weights:
            head = QuantLinear.from_weight(head_w, None, "int8")
        else:
            head = QuantLinear(cfg.d_model, cfg.vocab_size, "int8", None, False)
        emb = QuantEmbedding(cfg.vocab_size, cfg.d_model)
        if cfg.tie_embeddings:  # one int8 matrix: the embedding's buffers are the head's tensors
            emb.qweight, emb.scales = head.qweight, head.scales
        elif from_weights:
            q, s = quantize_int8(model.embed_tokens.weight)
            emb.qweight.copy_(q)
            emb.scales.copy_(s)
        model.lm_head, model.embed_tokens = head, emb
    return model


def quantized_tensors(model) -> dict[str, torch.Tensor]:
    """The quantized model's state as a checkpoint stores it (the tied head's tensors once, under embed_tokens)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        for k in ("lm_head.qweight", "lm_head.scales"):
            sd.pop(k)
    return sd


def load_quantized(model, tensors: dict[str, torch.Tensor], where) -> None:
    """Fill a model built by `quantize_model(..., from_weights=False)` from checkpoint tensors; one-line errors."""
    own = quantized_tensors(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise LmforgeError(f"{where}: weights do not fit the quantized model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")  # fmt: skip
    for name, t in tensors.items():
        if t.shape != own[name].shape or t.dtype != own[name].dtype:
            raise LmforgeError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, "
                               f"the quantized model wants {own[name].dtype} {tuple(own[name].shape)}")  # fmt: skip
    model.load_state_dict(tensors, strict=False)  # copies in place: the tied head keeps sharing the embedding's


def is_quantized(model) -> bool:
    return isinstance(getattr(model, "lm_head", None), QuantLinear)


def weight_bytes(model) -> int:
    """Bytes of weights a forward reads: parameters plus stored (persistent) buffers, shared tensors once."""
    seen, total = set(), 0
    for t in model.state_dict().values():  # parameters and persistent buffers (not the rope/position tables)
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
