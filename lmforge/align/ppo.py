"""`lmforge ppo`: proximal policy optimization with a value head, against a verifier or a reward model.

    lmforge ppo --model runs/demo/sft --task add --out runs/ppo --max-steps 100
    lmforge ppo --model runs/demo/task-sft --task sort --out runs/ppo-sort --max-steps 100 --batch-size 32 \
        --set grad_accum=2 --set ppo_epochs=1 --set lam=1.0 --set temperature=0.7 --lr 3e-4   # BENCHMARKS.md
    lmforge ppo --model runs/demo/sft --reward-model runs/rm --prompts prompts.jsonl --out runs/ppo-rm --lora

The RLHF recipe of Ziegler et al. (2019) and InstructGPT (Ouyang et al. 2022), as TRL implements
it. A rollout samples one answer to each of `batch_size * grad_accum * minibatches` training
prompts (KV-cache generator, temperature) and scores it: the task's checker (`--task`), or a
reward model (`--reward-model`, read at the answer's turn-end token; its tokenizer must be the
policy's). Per-token rewards are -kl_coef * KL(policy || reference) on every answer token (k1,
log pi - log ref of the sampled token) plus the score at the last answer token. A value head
(a linear layer on the policy's final hidden state, saved as `head.safetensors`) gives V per
token; GAE (gamma, lam) turns rewards and values into advantages (whitened over the rollout's
answer tokens) and returns. The loss is PPO's clipped surrogate with the old log-probs plus
vf_coef * the clipped value loss with the old values. The reference is the starting model
(its adapters off under --lora or --adapter: no second copy).

How ppo_epochs maps onto the shared loop: one loop step = one optimizer step = one minibatch
(`grad_accum` micro-batches of `batch_size` answers). A rollout holds `minibatches` of them and
is used for `ppo_epochs` passes, reshuffled into minibatches each pass, so a fresh rollout is
sampled every `ppo_epochs * minibatches` steps; its index seeds the prompt choice and the
sampling. Dropout is off throughout (as in TRL's PPO), so the first pass starts at ratio 1. A
checkpoint taken mid-rollout first writes that rollout to `RUN_DIR/rollouts/` (the old
log-probs and values come from weights that no longer exist), so a resumed run logs the same
losses as one never interrupted.

Logged per step: the rollout's reward (mean score), accuracy (--task), kl (mean per-token k1 to
the reference; what `max_kl` guards), explained variance of the old values, answer length and
the share that ended with the turn-end token; the minibatch's pg_loss, value_loss, clipfrac,
approx_kl (to the rollout policy) and entropy. Held-out greedy answers before the first step and
at each evaluation: exact-match accuracy (--task), or mean reward-model score on prompts held out
of `--prompts` by the run's seed.
"""

from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.align.losses import (
    explained_variance,
    gae,
    kl_per_token,
    kl_shaped_rewards,
    masked_mean,
    policy_gradient_loss,
    value_loss,
    whiten,
)
from lmforge.align.rollout import (
    RewardModelScorer,
    answer_logprobs,
    head_logprobs,
    kl_limit,
    load_prompts,
    question_messages,
    rows,
    sample,
    save_eval_items,
    split_prompts,
    task_accuracy,
)
from lmforge.align.tasks import get_task, make_split
from lmforge.chat.template import ChatFormat
from lmforge.config import require
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path
from lmforge.model.lora import adapters_disabled
from lmforge.train.common import setup_distributed, teardown_distributed
from lmforge.train.finetune import FinetuneConfig, FinetuneRun, add_stage_command
from lmforge.train.loop import train_loop

ROLLOUT_KEYS = ("idx", "targets", "old_logp", "old_values", "advantages", "returns")


@dataclass(frozen=True)
class PpoConfig(FinetuneConfig):
    """PPO: the shared fine-tuning fields plus these (batch_size = answers per micro-batch)."""

    task: str = ""  # verifiable task for the reward: add, mul, sort, reverse, convert
    reward_model: str = ""  # or a reward-model run (`lmforge reward`) for the reward
    prompts: str = ""  # reward-model mode: JSONL of {"prompt": text or messages}
    minibatches: int = 1  # optimizer steps per pass over a rollout
    ppo_epochs: int = 2  # passes over each rollout
    max_new_tokens: int = 32  # longest sampled answer
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts (1 = off)
    kl_coef: float = 0.05  # weight of the per-token KL penalty in the reward
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE's lambda; 1.0 (Monte Carlo) did better on a verifiable task from a fresh value head
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # how far a value may move from its rollout value before its loss is clipped
    vf_coef: float = 0.1  # weight of the value loss
    max_kl: float = 5.0  # stop if the rollout's mean per-token KL to the reference exceeds this (0 = never)
    train_prompts: int = 2000  # --task: distinct training prompts drawn from the task
    eval_prompts: int = 100  # held-out prompts for the greedy evaluation
    system: str = ""  # system prompt for every question ("" = none)
    lr: float = 1e-5  # peak LR

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.grad_accum * self.minibatches

    def validate(self) -> PpoConfig:
        get_task(self.task) if self.task else None
        checks = [
            (bool(self.task) != bool(self.reward_model), "ppo needs exactly one of --task or --reward-model"),
            (bool(self.prompts) == bool(self.reward_model),
             "--prompts goes with --reward-model (a task supplies its own prompts)"),
            (self.ppo_epochs >= 1 and self.minibatches >= 1, "ppo_epochs and minibatches must be >= 1"),
            (self.max_new_tokens >= 1 and self.temperature > 0, "max_new_tokens >= 1 and temperature > 0"),
            (0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma must be in (0, 1] and lam in [0, 1]"),
            (self.eval_prompts >= 0 and self.vf_coef >= 0 and self.kl_coef >= 0, "eval_prompts, vf_coef, kl_coef >= 0"),
            (not self.task or self.train_prompts >= self.rollout_size,
             "train_prompts must be >= batch_size * grad_accum * minibatches (one rollout)"),
        ]  # fmt: skip
        require(checks)
        return super().validate()


def register(subparsers) -> None:
    help = "PPO with a value head, rewarded by a verifiable task or a reward model"
    add_stage_command(subparsers, "ppo", help, PpoConfig, ppo, __doc__)


def policy_outputs(model, value_head, idx, targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(targets), entropy, values), each (B, T), from one forward: the value head reads the final hidden
    state; the output head runs on the answer positions only (0 elsewhere)."""
    hidden, _ = model(idx, return_hidden=True)
    logp, entropy = head_logprobs(model, hidden, targets)
    return logp, entropy, value_head(hidden).squeeze(-1).float()


class RolloutBuffer:
    """PPO's batches: a rollout sampled from the policy, served as minibatches for ppo_epochs passes.

    `drawn` (micro-batches served) says which rollout, which pass and which micro-batch come next.
    """

    def __init__(self, model, value_head, ref, fmt, items, score, cfg: PpoConfig, device, autocast, rank=0):
        self.model, self.value_head, self.ref, self.fmt, self.items, self.score = (
            model, value_head, ref, fmt, items, score)  # fmt: skip
        self.cfg, self.device, self.autocast, self.rank = cfg, device, autocast, rank
        self.per_rollout = cfg.ppo_epochs * cfg.minibatches * cfg.grad_accum
        self.drawn = 0
        self.rollout: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}

    @property
    def epoch(self) -> int:
        started = -(-self.drawn // self.per_rollout)
        return started * self.cfg.rollout_size // len(self.items)

    def next_batch(self) -> dict:
        cfg = self.cfg
        r, k = divmod(self.drawn, self.per_rollout)
        if k == 0:
            self._sample_rollout(r)
        pass_, micro = divmod(k, cfg.minibatches * cfg.grad_accum)
        order = list(range(cfg.rollout_size))
        random.Random(f"{cfg.seed}:{r}:{pass_}:{self.rank}").shuffle(order)
        pick = torch.tensor(order[micro * cfg.batch_size : (micro + 1) * cfg.batch_size], device=self.device)
        self.drawn += 1
        batch = {key: self.rollout[key][pick] for key in ROLLOUT_KEYS}
        batch["num_tokens"] = int((batch["targets"] != -100).sum())
        batch["stats"] = self.stats
        return batch

    @torch.no_grad()
    def _sample_rollout(self, r: int) -> None:
        cfg, fmt = self.cfg, self.fmt
        chosen = random.Random(f"{cfg.seed}:{r}:{self.rank}").sample(self.items, cfg.rollout_size)
        prompts = [fmt.encode(messages, add_generation_prompt=True) for messages, _ in chosen]
        outs, ended = sample(self.model, prompts, 1, cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + r, stop_ids=fmt.stop_ids)  # fmt: skip
        scores = self.score(chosen, [fmt.tokenizer.decode(o) for o in outs]).to(self.device)
        batch = rows(prompts, outs, ended, fmt.stop_ids[0], fmt.stop_ids[0], self.device)
        logp, values, ref_logp = [], [], []
        for i in range(0, cfg.rollout_size, cfg.batch_size):  # in micro-batches, as training reads them
            idx, targets = batch["idx"][i : i + cfg.batch_size], batch["targets"][i : i + cfg.batch_size]
            with self.autocast():
                lp, _, v = policy_outputs(self.model, self.value_head, idx, targets)
                with adapters_disabled(self.model) if self.ref is None else contextlib.nullcontext():
                    ref_lp, _, _ = answer_logprobs(self.ref if self.ref is not None else self.model,
                                                   {"idx": idx, "targets": targets})  # fmt: skip
            logp.append(lp)
            values.append(v)
            ref_logp.append(ref_lp)
        logp, values, ref_logp = torch.cat(logp), torch.cat(values), torch.cat(ref_logp)
        mask = batch["targets"] != -100
        kl = kl_per_token(logp, ref_logp, kind="k1")
        advantages, returns = gae(kl_shaped_rewards(scores, kl, mask, cfg.kl_coef), values, mask, cfg.gamma, cfg.lam)
        self.rollout = {"idx": batch["idx"], "targets": batch["targets"], "old_logp": logp,
                        "old_values": values * mask, "advantages": whiten(advantages, mask), "returns": returns}  # fmt: skip
        self.stats = {"reward": float(scores.mean()), "kl": float(masked_mean(kl, mask)),
                      "explained_variance": float(explained_variance(values, returns, mask)),
                      "length": sum(map(len, outs)) / len(outs), "ended": sum(ended) / len(ended)}  # fmt: skip
        if cfg.task:
            self.stats["accuracy"] = float((scores == 1).float().mean())

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.stats = int(state["drawn"]), dict(state["stats"])

    def save_rollout(self, folder, step: int) -> None:
        """Before the checkpoint of `step`: write the rollout it is in the middle of (nothing at a rollout's end)."""
        if self.drawn % self.per_rollout:
            with atomic_path(folder / f"step_{step:08d}.rank{self.rank}.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.rollout.items()}, str(tmp))

    def prune_rollouts(self, folder, step: int) -> None:
        """After the checkpoint of `step`: drop earlier rollouts whose checkpoints are gone (keep_last)."""
        checkpoints = folder.parent / "checkpoints"
        for old in folder.glob(f"step_*.rank{self.rank}.safetensors") if folder.is_dir() else []:
            name = old.name.split(".")[0]
            if int(name.removeprefix("step_")) < step and not (checkpoints / name).is_dir():
                old.unlink(missing_ok=True)

    def load_rollout(self, folder, step: int) -> None:
        if self.drawn % self.per_rollout == 0:
            return  # the resumed run starts a fresh rollout
        path = folder / f"step_{step:08d}.rank{self.rank}.safetensors"
        if not path.is_file():
            raise LmforgeError(f"{path}: missing; the checkpoint of step {step} is mid-rollout and needs it to resume")
        self.rollout = {k: v.to(self.device) for k, v in load_file(str(path)).items()}


def ppo(cfg: PpoConfig) -> dict:
    run = FinetuneRun(cfg, "ppo", resume_fields=("task", "reward_model", "prompts", "minibatches", "ppo_epochs",
                                                 "train_prompts", "eval_prompts", "system"))  # fmt: skip
    dd = setup_distributed(run.device, run.cfg.dist_timeout_s)
    try:
        return _train(run.cfg, run, dd)
    finally:
        teardown_distributed()


def _train(cfg: PpoConfig, run: FinetuneRun, dd) -> dict:
    ref = None if cfg.peft else copy.deepcopy(run.model).eval().requires_grad_(False)
    value_head = nn.Linear(run.model.cfg.d_model, 1)
    seeded = torch.Generator().manual_seed(cfg.seed)  # not the global RNG: the same head whatever ran before
    nn.init.normal_(value_head.weight, std=1.0 / (run.model.cfg.d_model + 1) ** 0.5, generator=seeded)
    nn.init.zeros_(value_head.bias)
    trainable, total = run.make_trainable(value_head)
    if ref is not None:
        ref.to(run.device)
    fmt = ChatFormat(run.tokenizer_dir)
    if not fmt.stop_ids:
        raise LmforgeError(f"{run.tokenizer_dir}: the tokenizer has no turn-end token to stop answers at")
    model, device, system = run.model, run.device, cfg.system or None
    if cfg.task:
        task = get_task(cfg.task)
        train_items = [(question_messages(q, system), a) for q, a in make_split(task, cfg.train_prompts, cfg.seed)]
        eval_items = make_split(task, cfg.eval_prompts, cfg.seed, "eval") if cfg.eval_prompts else []

        def score(chosen, answers):
            return torch.tensor([task.reward(text, a) for text, (_, a) in zip(answers, chosen, strict=True)])

        about = {"task": task.name, "description": task.description}
    else:
        scorer = RewardModelScorer(cfg.reward_model, run.tokenizer_dir, device)
        prompts, skipped = load_prompts(cfg.prompts, system)
        train_prompts, eval_items = split_prompts(prompts, cfg.eval_prompts, cfg.seed)
        if len(train_prompts) < cfg.rollout_size:
            raise LmforgeError(f"{cfg.prompts}: {len(train_prompts)} training prompts, fewer than one rollout "
                               f"({cfg.rollout_size} = batch_size x grad_accum x minibatches)")  # fmt: skip
        train_items = [(p, None) for p in train_prompts]

        def score(chosen, answers):
            return scorer([p for p, _ in chosen], answers)

        about = {"reward_model": cfg.reward_model, "prompts": cfg.prompts, "skipped": skipped}
    if dd.main:  # the first write to the run folder, once the inputs (task or reward model, prompts) are checked
        run.write_run_files({"reward.json": {**about, "train_prompts": len(train_items),
                                             "eval_prompts": len(eval_items)}})  # fmt: skip
    optimizer = run.optimizer()
    source = RolloutBuffer(model, value_head, ref, fmt, train_items, score, cfg, device, run.autocast, dd.rank)
    rollouts_dir = run.run_dir / "rollouts"
    if run.meta is not None:
        source.load_state_dict(run.meta["loader"])
        source.load_rollout(rollouts_dir, run.start_step)
    save = run.saver(optimizer, source, dd.main)
    if dd.main:
        run.say(f"reward: {cfg.task or cfg.reward_model}; rollouts of {cfg.rollout_size} answers, {cfg.ppo_epochs} "
                f"passes of {cfg.minibatches} minibatch(es) each; training {trainable:,} of {total:,} parameters")  # fmt: skip

    def step(model_, batch):
        model_.eval()  # dropout off: the rollout's log-probs were taken without it
        with run.autocast():
            logp, entropy, values = policy_outputs(model_, value_head, batch["idx"], batch["targets"])
        mask = batch["targets"] != -100
        pg = policy_gradient_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
        vl = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        log_ratio = (logp - batch["old_logp"]).detach()
        metrics = {
            **batch["stats"],
            "pg_loss": float(pg.detach()),
            "value_loss": float(vl.detach()),
            "clipfrac": float(masked_mean(((log_ratio.exp() - 1).abs() > cfg.clip).float(), mask)),
            "approx_kl": float(masked_mean(-log_ratio, mask)),
            "entropy": float(masked_mean(entropy, mask)),
        }
        return pg + cfg.vf_coef * vl, batch["num_tokens"], metrics

    def evaluate(step: int) -> dict | None:
        if not eval_items:
            return None
        if cfg.task:
            result = task_accuracy(model, fmt, task, eval_items, cfg.max_new_tokens, system)
            result = save_eval_items(run.run_dir, step, eval_items, result, write=dd.main)
        else:
            result = held_out_reward(model, fmt, scorer, eval_items, cfg.max_new_tokens)
        return {f"val_{k}": v for k, v in result.items()}

    def save_all(step: int, tokens_seen: int, cfg: PpoConfig) -> None:
        source.save_rollout(rollouts_dir, step)  # first: the checkpoint must never exist without its rollout
        save(step, tokens_seen, cfg)
        source.prune_rollouts(rollouts_dir, step)

    hooks = run.hooks(optimizer, source, evaluate, dd, save=save_all, check=kl_limit(cfg.max_kl))
    return {"trainable_params": trainable,
            **train_loop(cfg, model, optimizer, step, source, hooks, **run.progress(), desc="ppo")}  # fmt: skip


@torch.no_grad()
def held_out_reward(model, fmt, scorer, prompts: list[list[dict]], max_new_tokens: int) -> dict:
    """Mean reward-model score of greedy answers to held-out prompts, with a normal 95% interval."""
    ids = [fmt.encode(p, add_generation_prompt=True) for p in prompts]
    outs, ended = sample(model, ids, 1, max_new_tokens, temperature=0.0, stop_ids=fmt.stop_ids)
    r = scorer(prompts, [fmt.tokenizer.decode(o) for o in outs])
    mean, half = float(r.mean()), 1.96 * float(r.std()) / len(r) ** 0.5 if len(r) > 1 else 0.0
    return {"reward": mean, "reward_lo": mean - half, "reward_hi": mean + half, "prompts": len(prompts),
            "mean_length": sum(map(len, outs)) / len(outs), "ended": sum(ended) / len(ended)}  # fmt: skip
