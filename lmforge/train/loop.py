"""The optimizer-step loop every training stage shares: pretrain, sft, reward, dpo, grpo and ppo.

    last = train_loop(cfg, model, optimizer, step_fn, batches, hooks, start_step=0, tokens_seen=0, desc="sft")

A stage supplies its step and its batches; the loop knows nothing else about it:
- `step_fn(model, batch) -> (mean loss, real tokens, {metric: float})` for one micro-batch
  (`next_token_step` is pretraining's and SFT's; the alignment stages pass their losses);
- `batches`: anything with `next_batch()`, `state_dict()`, `load_state_dict()` and `epoch`
  (a token loader, packed conversations, preference pairs, or rollouts sampled from the policy);
- `hooks` (`Hooks`): where checkpoints, evaluations and metric records go.

The loop owns what must behave the same in every stage: the LR schedule, gradient
accumulation (with DDP's no_sync), clipping, the NaN policy, throughput and MFU, metrics
records, checkpoint-before-evaluation, the "before" evaluation of a fresh run, the time budget,
SIGTERM/Ctrl-C turning into "checkpoint, then exit cleanly", and running out of memory: with
`hooks.refit` (one process) it retries the step with a smaller micro-batch and more
accumulation (the same sequences per step), hands the refitted config to `refit` (which
resizes the loader and writes it to config.yaml) and says so; otherwise it stops with a
one-line error naming the step and micro-batch. `cfg` is frozen: a refit is a new config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.config import LoopConfig, save_config
from lmforge.errors import LmforgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import (
    lr_at,
    peak_flops,
    peak_memory_mb,
    set_activation_checkpointing,
    smaller_micro_batch,
)


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoint and exit)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class Hooks:
    """What the loop calls besides the stage's step."""

    save: Callable[[int, int, LoopConfig], None]  # save(step, tokens_seen, cfg as it runs now): a checkpoint
    evaluate: Callable[[int], dict | None]  # evaluate(step) -> a record (the loop adds "step" and logs it) or None
    logger: object  # MetricsLogger: log(record), close()
    run_dir: Path  # named in errors ("last good checkpoint: ...")
    # A stage's own guard, read on a step's averaged metrics before the update: a message stops the run (GRPO and PPO
    # stop when the KL to the reference passes max_kl), None lets it go on.
    check: Callable[[dict], str | None] | None = None
    # Out of memory in a forward/backward: refit(cfg with a smaller micro-batch) adopts it and the step is retried
    # (one process only: under DDP the other ranks would wait in all-reduce). None: a one-line error instead.
    refit: Callable[[LoopConfig], None] | None = None
    flops_per_token: float = 0.0  # model FLOPs per trained token, for MFU on a known GPU
    evaluate_first: bool = True  # a fresh run evaluates at step 0 too (the "before" figure)


def next_token_step(autocast: Callable[[], contextlib.AbstractContextManager]):
    """The step of pretraining and SFT: next-token loss on a batch `(x, y)` or a dict of forward arguments
    (`idx`, `targets`, optional `positions`, `doc_ids`) plus `num_tokens`, the real (non-padding) tokens."""

    def step(model, batch) -> tuple[torch.Tensor, int, dict]:
        with autocast():
            if isinstance(batch, dict):
                batch = dict(batch)
                n = batch.pop("num_tokens")
                _, loss = model(**batch)
                return loss, n, {}
            x, y = batch
            _, loss = model(x, y)
            return loss, x.numel(), {}

    return step


def refit_loader(loader, run_dir: Path, main: bool) -> Callable[[LoopConfig], None]:
    """`Hooks.refit` for a loader with a micro-batch size `B`: resize it and write the refitted config.yaml."""

    def refit(cfg: LoopConfig) -> None:
        loader.B = cfg.batch_size
        if main:
            save_config(cfg, Path(run_dir) / "config.yaml")

    return refit


def _last_good(run_dir) -> str:
    found = ckpt.list_checkpoints(run_dir)
    return f"; last good checkpoint: {found[-1]}" if found else ""


def _accumulate(cfg: LoopConfig, model, step_fn, batches, device) -> tuple[torch.Tensor, int, dict]:
    """Forward and backward over grad_accum micro-batches: (summed mean loss, real tokens, averaged metrics)."""
    loss_sum = torch.zeros((), device=device)
    step_tokens, extra = 0, {}
    for micro in range(cfg.grad_accum):
        batch = batches.next_batch()
        no_sync = micro < cfg.grad_accum - 1 and dist.is_initialized() and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            loss, n, metrics = step_fn(model, batch)
            loss = loss / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach()
        step_tokens += n
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
    return loss_sum, step_tokens, extra


def _refitted(cfg: LoopConfig, hooks: Hooks, where: str, step: int, message: str, desc: str) -> LoopConfig:
    """The config with a smaller micro-batch (the same sequences per step) after running out of memory, or a
    one-line error when it cannot shrink (micro-batch 1, several processes, or a stage without refit)."""
    first_line = message.splitlines()[0]
    smaller = smaller_micro_batch(cfg.batch_size) if hooks.refit and not dist.is_initialized() else None
    if smaller is None:
        hint = (
            "lower seq_len, or use LoRA, freeze or FSDP"
            if cfg.batch_size == 1
            else "lower batch_size and raise grad_accum"
        )
        raise LmforgeError(
            f"out of memory on {where} at step {step} with micro-batch {cfg.batch_size} x seq_len {cfg.seq_len}: "
            f"{hint} ({first_line})"
        )
    new = dataclasses.replace(cfg, batch_size=smaller, grad_accum=cfg.grad_accum * (cfg.batch_size // smaller))
    print(f"lmforge {desc}: out of memory on {where} at micro-batch {cfg.batch_size}; using micro-batch {smaller} x "
          f"{new.grad_accum} accumulation (the same {cfg.batch_size * cfg.grad_accum} sequences per step)",
          file=sys.stderr)  # fmt: skip
    return new


def train_loop(cfg: LoopConfig, model, optimizer, step_fn, batches, hooks: Hooks, *, start_step: int = 0,
               tokens_seen: int = 0, desc: str = "train") -> dict:  # fmt: skip
    """Run optimizer steps start_step+1 .. cfg.max_steps of one stage.

    Returns the last metrics record with `step` (the last step done) and `stopped` (None when max_steps was
    reached, else "SIGINT", "SIGTERM" or "time_budget"), plus `before` (the step-0 evaluation of a fresh run) and
    `after` (the last evaluation) where there were any.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # Clip everything the optimizer updates (a reward or value head too, not only the model).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    where = f"{device}" + (f" (rank {rank})" if world > 1 else "")
    peak = peak_flops(device)
    evals: list[dict] = []
    recompute, size = set_activation_checkpointing(model, cfg.activation_checkpointing)
    if recompute and rank == 0 and cfg.activation_checkpointing == "auto":
        print(f"lmforge {desc}: activation checkpointing on ({size / 1e6:.0f}M parameters; "
              "--activation-checkpointing off keeps the activations: faster, more memory)", file=sys.stderr)  # fmt: skip

    def evaluate(step: int) -> None:
        rec = hooks.evaluate(step)
        if rec is not None:
            rec = {"step": step, **rec}
            hooks.logger.log(rec)
            evals.append(rec)

    if hooks.evaluate_first and start_step == 0:
        evaluate(0)
    step, last, skipped, stopped = start_step, {}, 0, None
    began = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=rank != 0, desc=desc, dynamic_ncols=True,
               mininterval=1.0)  # fmt: skip
    with StopFlag() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, peak=cfg.lr, total=cfg.max_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule,
                       min_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            position, oom = batches.state_dict(), None
            try:
                loss_sum, step_tokens, extra = _accumulate(cfg, model, step_fn, batches, device)
            except torch.OutOfMemoryError as e:
                oom = str(e) or "out of memory"  # only the message: the traceback holds the step's activations
            if oom is not None:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                cfg = _refitted(cfg, hooks, where, step + 1, oom, desc)  # raises unless the micro-batch could shrink
                hooks.refit(cfg)
                batches.load_state_dict(position)  # the step again, from the same data, in smaller pieces
                continue
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                t = torch.tensor(step_tokens, device=device)
                dist.all_reduce(t)
                step_tokens = int(t)
            loss_value = float(loss_sum)
            grad_norm = float("nan")
            # Stop before the optimizer step, so the last checkpoint stays good.
            bad = next((f"{k} is {v}" for k, v in extra.items() if not math.isfinite(v)), None)
            bad = bad or (hooks.check(extra) if hooks.check else None)
            if bad:
                raise LmforgeError(f"{bad} at step {step + 1}{_last_good(hooks.run_dir)}")
            if not math.isfinite(loss_value):
                if cfg.nan_policy == "stop":
                    raise LmforgeError(
                        f"loss is {loss_value} at step {step + 1}{_last_good(hooks.run_dir)} (or set nan_policy=skip)"
                    )
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            else:
                if cfg.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step += 1
            tokens_seen += step_tokens
            tps = step_tokens / (time.perf_counter() - t0)
            mfu = hooks.flops_per_token * tps / (peak * world) if peak and hooks.flops_per_token else None
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                        "tokens_per_s": tps, "epoch": batches.epoch, "skipped": skipped, **extra}  # fmt: skip
                if mfu is not None:
                    last["mfu"] = mfu
                last.update(peak_memory_mb(device))
                hooks.logger.log(last)
            out_of_time = cfg.max_seconds > 0 and time.perf_counter() - began >= cfg.max_seconds
            final = step == cfg.max_steps or out_of_time or stop.signal is not None
            if final or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                hooks.save(step, tokens_seen, cfg)  # before evaluation: an evaluation crash loses nothing
            if step == cfg.max_steps or out_of_time or (cfg.eval_every and step % cfg.eval_every == 0):
                evaluate(step)
            if stop.signal or out_of_time:  # the caller says so (train.common.stop_exit_code, `lmforge run`)
                stopped = stop.signal or "time_budget"
                break
    bar.close()
    hooks.logger.close()
    if rank == 0:
        mem = peak_memory_mb(device)
        gpu = f", {mem['peak_gpu_mb']:,.0f} MB on the GPU" if "peak_gpu_mb" in mem else ""
        checkpointing = "on" if recompute else "off"
        print(f"lmforge {desc}: peak memory {mem['peak_rss_mb']:,.0f} MB resident{gpu} "
              f"(activation checkpointing {checkpointing})", file=sys.stderr)  # fmt: skip
    # `stopped` tells the caller (a command's exit code, `lmforge run`'s summary) that the run ended early.
    result = {**last, "step": step, "stopped": stopped}
    if hooks.evaluate_first and start_step == 0 and evals and evals[0]["step"] == 0:
        result["before"] = evals[0]
    if evals and evals[-1]["step"] > 0:
        result["after"] = evals[-1]
    return result
