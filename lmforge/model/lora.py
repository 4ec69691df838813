"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    from lmforge.model.lora import LoraConfig, apply_lora, lora_tensors, merge_lora
    apply_lora(model, LoraConfig(rank=8, alpha=16))   # freezes the base, adds trainable A, B
    ...train...
    save_file(lora_tensors(model), "adapter.safetensors")
    merge_lora(model)                                  # W <- W + (alpha/r) B A: a plain model again

A frozen linear layer W gets a trainable low-rank update: y = W x + (alpha/r) B A dropout(x),
with A (r x in) random and B (out x r) zero, so training starts exactly at the base model.
The wrapped layer keeps its `weight`/`bias` names, so base checkpoints load unchanged; the
adapter adds `<layer>.lora_A` and `<layer>.lora_B`. The other adapter kind, nonlinear bottlenecks that do not
merge, is lmforge/model/bottleneck.py; `adapters_disabled` switches off either.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError, warn
from lmforge.model.matmul import Linear, linear

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = 8  # r: the rank of the update
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # dropout on the adapter's input
    targets: tuple[str, ...] = ALL_LINEAR  # linear layers (by name) that get adapters

    def validate(self) -> LoraConfig:
        if self.rank < 1:
            raise LmforgeError(f"lora rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(ALL_LINEAR))
        if unknown or not self.targets:
            raise LmforgeError(f"lora targets must be among {', '.join(ALL_LINEAR)}, got {list(self.targets)}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        fields = {k: v for k, v in d.items() if k != "kind"}  # "kind": "lora" is optional (bottleneck runs say theirs)
        return cls(**{**fields, "targets": tuple(d.get("targets", ALL_LINEAR))}).validate()


class LoraLinear(nn.Linear):
    """nn.Linear plus a low-rank trainable update; the base weight and bias are frozen."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialize A
        self.scaling = cfg.alpha / cfg.rank
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias) + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self) -> Linear:
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.to(self.weight.dtype)


def _linears(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Module]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in targets and isinstance(child, nn.Linear)
    ]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model`, then wrap the target linears with trainable adapters (in place)."""
    return wrap_linears(model, cfg.validate(), LoraLinear, "lora")


def wrap_linears(model: nn.Module, cfg, layer_cls: type[nn.Linear], what: str) -> nn.Module:
    """Freeze every parameter, then replace each linear named in `cfg.targets` by `layer_cls(linear, cfg)`, in
    place (LoRA's and the bottleneck adapters' (lmforge/model/bottleneck.py) shared setup)."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = _linears(model, cfg.targets)
    experts = getattr(getattr(model, "cfg", None), "n_experts", 0)
    if experts and {"gate_proj", "up_proj", "down_proj"} & set(cfg.targets):
        warn(f"{what}: a mixture-of-experts model's experts are stacked tensors, not linears: they get no adapters")
    if not found:
        raise LmforgeError(f"{what}: no linear layer named {list(cfg.targets)} in the model")
    for parent, name, child in found:
        if not isinstance(child, layer_cls):
            setattr(parent, name, layer_cls(child, cfg))
    return model


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a LoRA checkpoint stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter weights into a model already wrapped by `apply_lora`, checking names and shapes."""
    load_adapter_state(model, tensors, where, ".lora_")


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, marker: str) -> None:
    """Load the adapter tensors (state-dict names containing `marker`) into `model`: the names and shapes must be
    exactly the model's, else a one-line error naming `where`."""
    own = {k: v for k, v in model.state_dict().items() if marker in k}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise LmforgeError(
            f"{where}: adapter does not fit the model (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise LmforgeError(f"{where}: adapter {k} has shape {tuple(v.shape)}, the base wants {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); the model has plain nn.Linear layers again."""
    for parent, name, child in _linears(model, ALL_LINEAR):
        if isinstance(child, LoraLinear):
            setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model without its adapters, LoRA or bottleneck (the frozen reference of DPO/PPO/GRPO, no second
    copy): each adapter's `scaling` is 0 meanwhile."""
    from lmforge.model.bottleneck import BottleneckLinear  # it builds on this module

    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, BottleneckLinear))]
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, scaling in zip(layers, saved, strict=True):
            m.scaling = scaling
