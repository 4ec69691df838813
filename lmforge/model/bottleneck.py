"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

    lmforge sft --model models/smollm2 --data chitchat --out runs/smol-adapter --adapter --set adapter_size=16

    from lmforge.model.bottleneck import AdapterConfig, adapter_tensors, apply_adapters
    apply_adapters(model, AdapterConfig(size=64))      # freezes the base, adds trainable bottlenecks
    ...train...
    save_file(adapter_tensors(model), "adapter.safetensors")

A small trainable bottleneck sits on the output of a frozen linear layer, before the residual add:
h = W x + b, y = h + up(silu(down(h))), with down d -> m and up m -> d (m = `size`, the bottleneck width).
By default it follows the attention's output projection and the MLP's (`o_proj`, `down_proj`): Houlsby's
two places in each block. `up` starts at zero, so training starts exactly at the base model. The wrapped
layer keeps its `weight`/`bias` names, so base checkpoints load unchanged; the adapter adds
`<layer>.adapter_down` and `<layer>.adapter_up`. Unlike LoRA the adapter is nonlinear: it does not fold
into the weights, so a trained adapter is always run as the base with these layers in it (`lmforge export`
and `quantize` refuse such a run; `lmforge.model.lora.adapters_disabled` switches them off).

Deviations from the paper, each for lmforge's setting: the nonlinearity is SiLU (the paper leaves it open;
SiLU is the activation of the Llama-family models we fine-tune); `up` is initialized to zero rather than
near zero, so step 0 is the base model exactly (as LoRA's B = 0); the layer norms stay frozen (Houlsby
trains them too), so the adapter file is the whole difference from the base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.lora import ALL_LINEAR, load_adapter_state, wrap_linears
from lmforge.model.matmul import Linear, linear

KIND = "bottleneck"  # meta["adapter"]["kind"] of a run trained with these (a LoRA run's has no kind, or "lora")
HOULSBY = ("o_proj", "down_proj")  # after attention's output projection and after the MLP's


@dataclass
class AdapterConfig:
    size: int = 64  # m: the bottleneck width of each adapter
    dropout: float = 0.0  # dropout inside the bottleneck (after the nonlinearity)
    targets: tuple[str, ...] = HOULSBY  # linear layers (by name) whose output gets an adapter

    def validate(self) -> AdapterConfig:
        if self.size < 1:
            raise LmforgeError(f"adapter size must be >= 1, got {self.size}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(ALL_LINEAR))
        if unknown or not self.targets:
            raise LmforgeError(f"adapter targets must be among {', '.join(ALL_LINEAR)}, got {list(self.targets)}")
        return self

    def to_dict(self) -> dict:
        return {"kind": KIND, **asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        fields = {k: v for k, v in d.items() if k != "kind"}
        return cls(**{**fields, "targets": tuple(d.get("targets", HOULSBY))}).validate()


class BottleneckLinear(nn.Linear):
    """nn.Linear followed by a trainable bottleneck on its output; the base weight and bias are frozen."""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        dev, dtype = base.weight.device, base.weight.dtype
        self.adapter_down = Linear(self.out_features, cfg.size, device=dev, dtype=dtype)
        self.adapter_up = Linear(cfg.size, self.out_features, device=dev, dtype=dtype)
        with torch.no_grad():  # Houlsby's init for `down`; `up` zero so the adapter starts as the identity
            nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()
        self.adapter_dropout = nn.Dropout(cfg.dropout)
        self.scaling = 1.0  # 0 switches the adapter off (adapters_disabled: the base model, for a reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.weight, self.bias)
        if not self.scaling:
            return h
        return h + self.scaling * self.adapter_up(self.adapter_dropout(F.silu(self.adapter_down(h))))


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze every parameter of `model`, then wrap the target linears with trainable bottlenecks (in place)."""
    return wrap_linears(model, cfg.validate(), BottleneckLinear, "adapter")


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a bottleneck-adapter checkpoint stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".adapter_" in k}


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter weights into a model already wrapped by `apply_adapters`, checking names and shapes."""
    load_adapter_state(model, tensors, where, ".adapter_")
