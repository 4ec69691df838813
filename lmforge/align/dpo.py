"""`lmforge dpo`: direct preference optimization against a frozen reference (DPO, IPO or SimPO).

    lmforge prefs --source task:add --out pairs.jsonl
    lmforge dpo --model runs/demo/sft --data pairs.jsonl --out runs/dpo --set beta=0.1 --max-steps 100
    lmforge dpo --model models/smollm2 --data pairs.jsonl --out runs/dpo-lora --lora --set loss=ipo
    lmforge dpo --model runs/sort-sft --data onpolicy.jsonl --out runs/rpo --set sft_coef=1   # RPO: + NLL(chosen)

The reference is the starting model, frozen: a second copy for full fine-tuning, or the same
weights with the adapters switched off for `--lora`/`--adapter` (no second copy in memory). Each step logs
the implicit rewards beta * log(pi/ref) of chosen and rejected answers, their margin and how
often chosen wins, so a stuck run is visible. On held-out pairs (split by prompt) it logs,
before the first step and at each evaluation:
- `val_pref_accuracy`: how often the model itself prefers the chosen answer,
  log pi(chosen) > log pi(rejected) (meaningful for the starting model too);
- `val_logratio_margin`: mean of log pi(chosen) - log pi(rejected);
- `val_reward_accuracy` / `val_reward_margin`: the same for the implicit rewards (0 at the start).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from lmforge.align.batching import PairLoader, pair_batches, pair_data, side_sums
from lmforge.align.losses import PREFERENCE_LOSSES, chosen_nll
from lmforge.align.rollout import answer_logprobs
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson_interval
from lmforge.model.lora import adapters_disabled
from lmforge.train.common import setup_distributed, teardown_distributed
from lmforge.train.finetune import FinetuneConfig, FinetuneRun, add_stage_command
from lmforge.train.loop import train_loop


@dataclass(frozen=True)
class DpoConfig(FinetuneConfig):
    """Direct preference optimization: the shared fine-tuning fields plus these."""

    data: str = ""  # preference pairs JSONL (prompt, chosen, rejected)
    loss: str = "dpo"  # dpo, ipo or simpo
    beta: float = 0.1  # strength of the KL anchor (dpo, ipo); reward scale for simpo (try 2.0)
    simpo_gamma: float = 0.5  # simpo's target margin
    # ipo's log-probabilities: mean (per answer token, as Azar et al. and TRL; beta means the same at any answer
    # length) or sum (over the answer, as dpo uses them: the margin target 1/(2 beta) then binds long answers less)
    ipo_logps: str = "mean"
    sft_coef: float = 0.0  # RPO (Pang et al. 2024): + sft_coef * the chosen answer's per-token NLL
    val_fraction: float = 0.1  # held-out prompts
    packing: bool = True  # a batch's sides packed padding-free into rows (same losses; off: a padded row per side)
    lr: float = 5e-6  # peak LR (preference optimization wants a smaller one than SFT)

    def validate(self) -> DpoConfig:
        if not self.data:
            raise LmforgeError("config: dpo needs --data (preference pairs JSONL)")
        if self.loss not in PREFERENCE_LOSSES:
            raise LmforgeError(f"config: loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}")
        if self.ipo_logps not in ("mean", "sum"):
            raise LmforgeError(f"config: ipo_logps must be mean or sum, got {self.ipo_logps!r}")
        if self.beta <= 0 or self.sft_coef < 0:
            raise LmforgeError("config: beta must be > 0 and sft_coef >= 0")
        return super().validate()


def register(subparsers) -> None:
    add_stage_command(subparsers, "dpo", "direct preference optimization (DPO / IPO / SimPO) on pairs", DpoConfig, dpo,
                      __doc__)  # fmt: skip


def pair_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi(chosen), log pi(rejected), answer lengths (2B,)) for a pair batch."""
    logp, mask, _ = answer_logprobs(model, batch)
    c, r = side_sums(logp, batch).chunk(2)
    return c, r, side_sums(mask.float(), batch)


def dpo(cfg: DpoConfig) -> dict:
    run = FinetuneRun(cfg, "dpo", resume_fields=("data", "loss", "beta", "simpo_gamma", "ipo_logps", "sft_coef",
                                                     "val_fraction"))  # fmt: skip
    dd = setup_distributed(run.device, run.cfg.dist_timeout_s)
    try:
        return _train(run.cfg, run, dd)
    finally:
        teardown_distributed()


def _train(cfg: DpoConfig, run: FinetuneRun, dd) -> dict:
    # The reference: the starting weights, frozen. With LoRA or adapters, the policy with its adapters off.
    ref = None if cfg.peft or cfg.loss == "simpo" else copy.deepcopy(run.model).eval().requires_grad_(False)
    trainable, total = run.make_trainable()
    if ref is not None:
        ref.to(run.device)
    fmt, train, val, summary, report = pair_data(cfg, run)
    if dd.main:  # only now that the pairs are read: a bad --data leaves no run folder behind
        run.write_run_files({"data_report.json": report})
        run.say(f"{cfg.loss}, beta={cfg.beta}: {summary}; training {trainable:,} of {total:,} parameters")
    pad_id = fmt.stop_ids[0] if fmt.stop_ids else 0
    model, device = run.model, run.device
    optimizer = run.optimizer()
    loader = PairLoader(train, cfg.batch_size, pad_id, cfg.seed, dd.rank, dd.world_size, device, cfg.packing)
    if run.meta is not None:
        loader.load_state_dict(run.meta["loader"])
    val_batches = pair_batches(val, cfg.batch_size, pad_id, device, cfg.packing)[: cfg.eval_batches]
    loss_fn = PREFERENCE_LOSSES[cfg.loss]

    @torch.no_grad()
    def reference(batch):
        if cfg.loss == "simpo":
            return None, None
        ctx = adapters_disabled(model) if ref is None else contextlib.nullcontext()
        with ctx:
            c, r, _ = pair_logprobs(ref if ref is not None else model, batch)
        return c, r

    def step(model_, batch):
        model_.eval()  # dropout off (LoRA's too), as TRL's disable_dropout: the policy and reference compare cleanly
        ref_c, ref_r = reference(batch)
        with run.autocast():
            pi_c, pi_r, lengths = pair_logprobs(model_, batch)
        len_c, len_r = lengths.chunk(2)
        loss, rc, rr = loss_fn(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, gamma=cfg.simpo_gamma, len_c=len_c,
                               len_r=len_r, per_token=cfg.ipo_logps == "mean")  # fmt: skip
        if cfg.sft_coef:  # keeps the chosen answers likely: DPO alone may push both sides down
            loss = loss + cfg.sft_coef * chosen_nll(pi_c, len_c)
        metrics = {"reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
                   "reward_margin": float((rc - rr).mean()), "reward_accuracy": float((rc > rr).float().mean()),
                   "logp_chosen": float(pi_c.detach().mean()), "logp_rejected": float(pi_r.detach().mean())}  # fmt: skip
        return loss, batch["num_tokens"], metrics

    @torch.no_grad()
    def evaluate(step: int) -> dict | None:
        if not val_batches:
            return None
        model.eval()
        wins = reward_wins = n = 0
        margin = reward_margin = 0.0
        for batch in val_batches:
            pi_c, pi_r, _ = pair_logprobs(model, batch)
            ref_c, ref_r = reference(batch)
            wins += int((pi_c > pi_r).sum())
            margin += float((pi_c - pi_r).sum())
            if ref_c is not None:
                d = (pi_c - ref_c) - (pi_r - ref_r)
                reward_wins += int((d > 0).sum())
                reward_margin += float(cfg.beta * d.sum())
            n += len(pi_c)
        model.train()
        lo, hi = wilson_interval(wins, n)
        return {"val_pref_accuracy": wins / n, "val_pref_accuracy_lo": lo, "val_pref_accuracy_hi": hi,
               "val_logratio_margin": margin / n, "val_reward_accuracy": reward_wins / n,
               "val_reward_margin": reward_margin / n, "val_pairs": n}  # fmt: skip

    hooks = run.hooks(optimizer, loader, evaluate, dd)
    return {"trainable_params": trainable,
            **train_loop(cfg, model, optimizer, step, loader, hooks, **run.progress(), desc="dpo")}  # fmt: skip
