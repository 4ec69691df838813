"""The optimizer every training stage builds: AdamW, or Muon on the blocks' matrices with AdamW on the rest.

    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device=device)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), device, kind="muon")   # --set optimizer=muon

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalizes each matrix's momentum with a few Newton-Schulz
iterations, so every direction of the update moves at the same rate. It is defined for matrices only: the
embeddings, the output head, norms and biases stay on AdamW, as in modded-nanogpt and nanochat. Muon's step is
scaled to AdamW's update RMS (Moonshot's `match_rms_adamw`, Liu et al. 2025), so the same lr and weight decay
serve both halves and the one LR schedule of the loop drives them together.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "muon")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, device: torch.device,
                   kind: str = "adamw"):  # fmt: skip
    """AdamW with weight decay on matrices only (embeddings and linear weights), not on norms or biases; with
    kind="muon", the 2-D weights inside the Transformer blocks go to Muon instead (OptimizerPair)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if kind == "muon" and p.dim() == 2 and "layers." in name:  # attention and MLP projections (LoRA's too)
            matrices.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CUDA and CPU: on CPU the default is a per-parameter Python loop (measured ~20% of a
    # tiny-model step; see BENCHMARKS.md). Same update math.
    fused = device.type in ("cuda", "cpu")
    groups = [g for g in groups if g["params"]]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None) if groups else None
    if not matrices:
        return adamw
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return OptimizerPair(muon, adamw) if adamw is not None else muon


class OptimizerPair:
    """Two optimizers stepped, scheduled and checkpointed as one: `param_groups` are theirs (the loop sets each
    group's lr), and the state dict is one flat {"state", "param_groups"} whose parameter keys say which optimizer
    they belong to ("0:3" = the first optimizer's parameter 3), so checkpoints store it like any other."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups = {}, []
        for i, o in enumerate(self.optimizers):
            sd = o.state_dict()
            state.update({f"{i}:{pid}": s for pid, s in sd["state"].items()})
            groups += [{**g, "params": [f"{i}:{pid}" for pid in g["params"]], "optimizer": i}
                       for g in sd["param_groups"]]  # fmt: skip
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        for i, o in enumerate(self.optimizers):
            mine = f"{i}:"
            state = {int(k[len(mine) :]): v for k, v in sd["state"].items() if str(k).startswith(mine)}
            groups = [{**{k: v for k, v in g.items() if k != "optimizer"},
                       "params": [int(str(p)[len(mine) :]) for p in g["params"]]}
                      for g in sd["param_groups"] if g.get("optimizer") == i]  # fmt: skip
            o.load_state_dict({"state": state, "param_groups": groups})  # torch checks the groups fit
