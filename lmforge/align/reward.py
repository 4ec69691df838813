"""`lmforge reward`: a reward model, a scalar head on the language model trained on ranked pairs.

    lmforge prefs --source chitchat --out pairs.jsonl
    lmforge reward --model runs/demo/sft --data pairs.jsonl --out runs/rm --max-steps 200

The score of a (prompt, answer) is a linear head on the final hidden state at the answer's
last token (its turn-end token). Training minimizes the Bradley-Terry ranking loss
-log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022). The held-out split is by prompt;
pairwise accuracy on it is logged before the first step and at each evaluation, with its 95%
Wilson interval. The head is saved as `head.safetensors` next to the body's weights (or its
LoRA adapter); `load_reward_model` reads it back for best-of-N and PPO.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.align.batching import PairLoader, pair_batches, pair_data
from lmforge.align.losses import reward_ranking_loss
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson_interval
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import setup_distributed, teardown_distributed
from lmforge.train.finetune import FinetuneConfig, FinetuneRun, add_stage_command
from lmforge.train.loop import train_loop


@dataclass(frozen=True)
class RewardConfig(FinetuneConfig):
    """Reward modelling: the shared fine-tuning fields plus these."""

    data: str = ""  # preference pairs JSONL (prompt, chosen, rejected); `lmforge prefs` builds some
    val_fraction: float = 0.1  # held-out prompts for pairwise accuracy

    def validate(self) -> RewardConfig:
        if not self.data:
            raise LmforgeError("config: reward needs --data (preference pairs JSONL)")
        return super().validate()


def register(subparsers) -> None:
    help = "train a reward model on preference pairs (pairwise ranking loss)"
    add_stage_command(subparsers, "reward", help, RewardConfig, train_reward, __doc__)


def scores(model, head: nn.Module, batch: dict) -> torch.Tensor:
    """Reward of each row: the head on the hidden state at the row's last token, (rows,)."""
    hidden, _ = model(batch["idx"], return_hidden=True)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["last"]]).squeeze(-1)


@torch.no_grad()
def pairwise_accuracy(model, head, batches) -> dict:
    was = model.training
    model.eval()
    right = n = 0
    margin = 0.0
    for batch in batches:
        r = scores(model, head, batch)
        c, rj = r.chunk(2)
        right += int((c > rj).sum())
        margin += float((c - rj).sum())
        n += len(c)
    model.train(was)
    lo, hi = wilson_interval(right, n)
    return {"val_accuracy": right / max(n, 1), "val_accuracy_lo": lo, "val_accuracy_hi": hi,
            "val_margin": margin / max(n, 1), "val_pairs": n}  # fmt: skip


def train_reward(cfg: RewardConfig) -> dict:
    run = FinetuneRun(cfg, "reward", resume_fields=("data", "val_fraction"))
    dd = setup_distributed(run.device, run.cfg.dist_timeout_s)
    try:
        return _train(run.cfg, run, dd)
    finally:
        teardown_distributed()


def _train(cfg: RewardConfig, run: FinetuneRun, dd) -> dict:
    head = nn.Linear(run.model.cfg.d_model, 1)
    with torch.no_grad():  # seeded: the same run gives the same head in any process
        g = torch.Generator().manual_seed(cfg.seed)
        head.weight.normal_(0.0, 1.0 / (run.model.cfg.d_model + 1) ** 0.5, generator=g)
        head.bias.zero_()
    trainable, total = run.make_trainable(head)
    fmt, train, val, summary, report = pair_data(cfg, run)
    if dd.main:  # only now that the pairs are read: a bad --data leaves no run folder behind
        run.write_run_files({"data_report.json": report})
        run.say(f"{summary}; training {trainable:,} of {total:,} parameters")
    pad_id = fmt.stop_ids[0] if fmt.stop_ids else 0
    device = run.device
    optimizer = run.optimizer()
    loader = PairLoader(train, cfg.batch_size, pad_id, cfg.seed, dd.rank, dd.world_size, device)
    if run.meta is not None:
        loader.load_state_dict(run.meta["loader"])
    val_batches = pair_batches(val, cfg.batch_size, pad_id, device)[: cfg.eval_batches]
    model = run.model

    def step(model_, batch):
        with run.autocast():
            r = scores(model_, head, batch)
        c, rj = r.float().chunk(2)
        loss = reward_ranking_loss(c, rj)
        return (
            loss,
            batch["num_tokens"],
            {"accuracy": float((c > rj).float().mean()), "margin": float((c - rj).detach().mean())},
        )

    def evaluate(step: int) -> dict | None:
        return pairwise_accuracy(model, head, val_batches) if val_batches else None

    hooks = run.hooks(optimizer, loader, evaluate, dd)
    result = {"trainable_params": trainable,
              **train_loop(cfg, model, optimizer, step, loader, hooks, **run.progress(), desc="reward")}  # fmt: skip
    if "after" in result:
        a = result["after"]
        print(f"lmforge reward: held-out pairwise accuracy {a['val_accuracy']:.3f} "
              f"(95% CI {a['val_accuracy_lo']:.3f}-{a['val_accuracy_hi']:.3f}, {a['val_pairs']} pairs)", file=sys.stderr)  # fmt: skip
    return result


def load_reward_model(path, device="cpu") -> tuple[nn.Module, nn.Module, object, dict]:
    """(body, head, tokenizer dir, meta) of a reward run, in eval mode."""
    model, where, meta = ckpt.load_model(path)
    if meta.get("stage") != "reward" or not (where / "head.safetensors").is_file():
        raise LmforgeError(f"{where}: not a reward model (train one with `lmforge reward`)")
    head = nn.Linear(model.cfg.d_model, 1)
    head.load_state_dict(ckpt.load_tensors(where / "head.safetensors"))
    return model.to(device).eval(), head.to(device).eval(), ckpt.tokenizer_dir(where, meta), meta
