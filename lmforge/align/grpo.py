"""`lmforge grpo`: group-relative policy optimization on a verifiable task (no critic).

    lmforge grpo --model models/smollm2 --task add --out runs/grpo --max-steps 50 --lora
    lmforge grpo --model runs/demo/sft --task sort --out runs/grpo-sort --set group_size=8 --set kl_coef=0.04

Each step samples `group_size` answers to each of `batch_size` training prompts (KV-cache
generator, temperature), scores them with the task's checker, and standardizes each reward
within its group (Shao et al. 2024, DeepSeekMath). The loss is PPO's clipped surrogate with
those advantages plus kl_coef * KL(policy || reference), the k3 estimator per answer token,
averaged over all answer tokens of the batch (a token-level mean, as DAPO recommends, rather
than the paper's mean of per-answer means, which favours short answers). One optimizer step per
rollout batch, so the ratio starts at 1 and the clip guards grad accumulation only.
The reference is the starting model (its adapters off under --lora or --adapter: no second copy).

Logged per step: reward, accuracy (share of answers with reward 1), kl, entropy, answer
length, share that ended with the turn-end token. Held-out exact-match accuracy (greedy, on
prompts never used for training) before the first step and at each evaluation. The run stops,
keeping its last good checkpoint, if KL exceeds `max_kl` or any metric turns NaN.
"""

from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass

import torch

from lmforge.align.losses import grpo_advantages, kl_per_token, masked_mean, policy_gradient_loss
from lmforge.align.rollout import (
    answer_logprobs,
    kl_limit,
    prompt_ids,
    rows,
    sample,
    save_eval_items,
    task_accuracy,
)
from lmforge.align.tasks import get_task, make_split
from lmforge.chat.template import ChatFormat
from lmforge.config import require
from lmforge.errors import LmforgeError
from lmforge.model.lora import adapters_disabled
from lmforge.train.common import setup_distributed, teardown_distributed
from lmforge.train.finetune import FinetuneConfig, FinetuneRun, add_stage_command
from lmforge.train.loop import train_loop


@dataclass(frozen=True)
class GrpoConfig(FinetuneConfig):
    """GRPO: the shared fine-tuning fields plus these (batch_size = prompts per micro-batch)."""

    task: str = ""  # verifiable task: add, mul, sort, reverse, convert
    group_size: int = 8  # answers sampled per prompt
    batch_size: int = 4  # prompts per micro-batch (each with group_size answers)
    max_new_tokens: int = 32  # longest sampled answer
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts (1 = off)
    kl_coef: float = 0.04  # weight of KL(policy || reference) in the loss (0: no reference pass, no KL logged)
    clip: float = 0.2  # PPO's ratio clip
    max_kl: float = 5.0  # stop if the mean per-token KL to the reference exceeds this (0 = never)
    train_prompts: int = 2000  # distinct training prompts drawn from the task
    eval_prompts: int = 100  # held-out prompts for greedy exact-match accuracy
    system: str = ""  # system prompt for every question ("" = none)
    share_prompts: bool = True  # each prompt runs once for its group of answers (same losses; off: full rows, as TRL)
    lr: float = 1e-5  # peak LR

    def validate(self) -> GrpoConfig:
        get_task(self.task) if self.task else None
        checks = [
            (bool(self.task), "grpo needs --task (add, mul, sort, reverse, convert)"),
            (self.group_size >= 2, "group_size must be >= 2 (advantages are relative within a group)"),
            (self.max_new_tokens >= 1 and self.temperature > 0, "max_new_tokens >= 1 and temperature > 0"),
            (self.eval_prompts >= 0 and self.train_prompts >= self.batch_size, "train_prompts >= batch_size"),
        ]  # fmt: skip
        require(checks)
        return super().validate()


def register(subparsers) -> None:
    help = "GRPO on a verifiable task (group-relative advantages, KL to the reference)"
    add_stage_command(subparsers, "grpo", help, GrpoConfig, grpo, __doc__)


class RolloutSource:
    """GRPO's batches: each is fresh rollouts from the current policy (reproducible by its index), scored by the
    task, with group-relative advantages; the loop reads it like any other batch source."""

    def __init__(self, model, fmt, task, items, cfg: GrpoConfig, device, rank=0):
        self.model, self.fmt, self.task, self.items, self.cfg, self.device, self.rank = (
            model, fmt, task, items, cfg, device, rank)  # fmt: skip
        self.drawn = 0
        self.stop_id = fmt.stop_ids[0]
        self.shared = cfg.share_prompts and getattr(model, "module", model).cfg.pos_encoding != "alibi"

    @property
    def epoch(self) -> int:
        return self.drawn * self.cfg.batch_size // len(self.items)

    def next_batch(self) -> dict:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:{self.drawn}:{self.rank}")
        chosen = rng.sample(self.items, cfg.batch_size)
        prompts = prompt_ids(self.fmt, [q for q, _ in chosen], cfg.system or None)
        outs, ended = sample(self.model, prompts, cfg.group_size, cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + self.drawn, stop_ids=self.fmt.stop_ids)  # fmt: skip
        self.drawn += 1
        answers = [a for _, a in chosen for _ in range(cfg.group_size)]
        rewards = torch.tensor(
            [self.task.reward(self.fmt.tokenizer.decode(o), a) for o, a in zip(outs, answers, strict=True)]
        )
        repeated = [p for p in prompts for _ in range(cfg.group_size)]
        owner = [i // cfg.group_size for i in range(len(repeated))] if self.shared else None  # each prompt runs once
        batch = rows(repeated, outs, ended, self.stop_id, self.stop_id, self.device, owner)
        batch["advantages"] = grpo_advantages(rewards, cfg.group_size).to(self.device)
        batch["stats"] = {"reward": float(rewards.mean()), "accuracy": float((rewards == 1).float().mean()),
                          "length": sum(map(len, outs)) / len(outs), "ended": sum(ended) / len(ended)}  # fmt: skip
        batch["num_tokens"] = int((batch["targets"] != -100).sum())
        return batch

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


def grpo(cfg: GrpoConfig) -> dict:
    run = FinetuneRun(cfg, "grpo", resume_fields=("task", "group_size", "train_prompts", "system"))
    dd = setup_distributed(run.device, run.cfg.dist_timeout_s)
    try:
        return _train(run.cfg, run, dd)
    finally:
        teardown_distributed()


def _train(cfg: GrpoConfig, run: FinetuneRun, dd) -> dict:
    keep_ref = cfg.kl_coef and not cfg.peft  # LoRA's or adapters' reference is the base with its adapters off
    ref = copy.deepcopy(run.model).eval().requires_grad_(False) if keep_ref else None
    trainable, total = run.make_trainable()
    if ref is not None:
        ref.to(run.device)
    fmt = ChatFormat(run.tokenizer_dir)
    if not fmt.stop_ids:
        raise LmforgeError(f"{run.tokenizer_dir}: the tokenizer has no turn-end token to stop answers at")
    task = get_task(cfg.task)
    train_items = make_split(task, cfg.train_prompts, cfg.seed, "train")
    eval_items = make_split(task, cfg.eval_prompts, cfg.seed, "eval") if cfg.eval_prompts else []
    model, device = run.model, run.device
    optimizer = run.optimizer()
    source = RolloutSource(model, fmt, task, train_items, cfg, device, dd.rank)
    if run.meta is not None:
        source.load_state_dict(run.meta["loader"])
    if dd.main:  # the first write to the run folder, once the inputs are checked
        about = {"task": task.name, "description": task.description, "train_prompts": len(train_items),
                 "eval_prompts": len(eval_items)}  # fmt: skip
        run.write_run_files({"task.json": about})
        run.say(f"task {task.name} ({task.description}); {cfg.batch_size} prompts x {cfg.group_size} answers per "
                f"micro-batch; training {trainable:,} of {total:,} parameters")  # fmt: skip

    def step(model_, batch):
        model_.eval()  # dropout off (TRL's disable_dropout): the log-probs are the sampling policy's own
        with run.autocast():
            logp, mask, entropy = answer_logprobs(model_, batch)
        pg = policy_gradient_loss(logp, logp.detach(), batch["advantages"], mask, cfg.clip)
        metrics = {**batch["stats"], "entropy": float(masked_mean(entropy, mask)), "pg_loss": float(pg.detach())}
        if not cfg.kl_coef:  # no KL term: the reference pass is skipped (and no KL is logged)
            return pg, batch["num_tokens"], metrics
        with torch.no_grad(), adapters_disabled(model) if ref is None else contextlib.nullcontext():
            ref_logp, _, _ = answer_logprobs(ref if ref is not None else model_, batch)
        kl = masked_mean(kl_per_token(logp, ref_logp), mask)
        return pg + cfg.kl_coef * kl, batch["num_tokens"], {**metrics, "kl": float(kl.detach())}

    def evaluate(step: int) -> dict | None:
        if not eval_items:
            return None
        acc = task_accuracy(model, fmt, task, eval_items, cfg.max_new_tokens, cfg.system or None)
        acc = save_eval_items(run.run_dir, step, eval_items, acc, write=dd.main)
        return {f"val_{k}": v for k, v in acc.items()}

    hooks = run.hooks(optimizer, source, evaluate, dd, check=kl_limit(cfg.max_kl))
    return {"trainable_params": trainable,
            **train_loop(cfg, model, optimizer, step, source, hooks, **run.progress(), desc="grpo")}  # fmt: skip
