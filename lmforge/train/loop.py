"""The optimizer-step loop every training stage shares (pretrain, sft, and the alignment stages).

    last = train_loop(cfg, parts, start_step=0, tokens_seen=0, desc="pretrain")

A stage builds its model, optimizer, loader and `save`/`evaluate` closures (`LoopParts`),
then hands them here. The loop owns what must behave the same everywhere: the LR
schedule, gradient accumulation (with DDP's no_sync), clipping, the NaN policy,
throughput and MFU, metrics records, checkpoint-before-evaluation, the time budget,
SIGTERM/Ctrl-C turning into "checkpoint, then exit cleanly", and running out of memory:
a stage that sets `fit_memory` (pretrain and sft, in one process) retries the step with a
smaller micro-batch and more accumulation (the same sequences per step) and says so;
elsewhere it stops with a one-line error naming the step and micro-batch.

A loader's `next_batch()` returns either `(x, y)` (pretraining) or a dict of forward
arguments (`idx`, `targets`, optional `positions`, `doc_ids`) plus `num_tokens`,
the real (non-padding) tokens it holds.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_text
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import lr_at, smaller_micro_batch


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
class LoopParts:
    model: torch.nn.Module  # what forward runs on (possibly DDP/compiled)
    optimizer: torch.optim.Optimizer
    loader: object  # next_batch(), epoch, state_dict()
    save: Callable[[int, int], None]  # save(step, tokens_seen)
    evaluate: Callable[[int], dict | None]  # evaluate(step) -> logged record or None
    logger: object  # MetricsLogger
    device: torch.device
    dd: object  # DistInfo from setup_distributed
    autocast: Callable[[], contextlib.AbstractContextManager]
    flops_per_token: float
    peak_flops: float | None
    run_dir: object
    # (model, batch, autocast) -> (mean loss, tokens, {metric: float}); default: next-token loss.
    # The alignment stages pass their own (DPO, reward ranking, policy gradient) and its metrics
    # (rewards, margins, KL, ...) are averaged over micro-batches into each metrics record.
    step_loss: Callable | None = None
    # Out of memory in a forward/backward: halve the loader's micro-batch (`loader.B`) and retry the step
    # (single process only: under DDP the other ranks would wait in all-reduce, so it stops with an error).
    fit_memory: bool = False


def forward_loss(model, batch, autocast) -> tuple[torch.Tensor, int, dict]:
    """(mean loss, real tokens, no extra metrics) for one micro-batch in either loader format."""
    with autocast():
        if isinstance(batch, dict):
            batch = dict(batch)
            n = batch.pop("num_tokens")
            _, loss = model(**batch)
            return loss, n, {}
        x, y = batch
        _, loss = model(x, y)
        return loss, x.numel(), {}


def _last_good(run_dir) -> str:
    found = ckpt.list_checkpoints(run_dir)
    return f"; last good checkpoint: {found[-1]}" if found else ""


def _guard(cfg, metrics: dict, step: int, run_dir) -> None:
    """Stop (before the optimizer step, so the last checkpoint stays good) on NaN metrics or a KL blow-up."""
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise LmforgeError(f"{name} is {value} at step {step}{_last_good(run_dir)}")
    max_kl = getattr(cfg, "max_kl", 0.0)
    if max_kl and metrics.get("kl", 0.0) > max_kl:
        raise LmforgeError(
            f"KL to the reference is {metrics['kl']:.3g} at step {step}, above max_kl={max_kl:g} "
            f"(lower the lr or raise the KL coefficient){_last_good(run_dir)}"
        )


def _accumulate(cfg, parts: LoopParts, step_loss) -> tuple[torch.Tensor, int, dict]:
    """Forward and backward over grad_accum micro-batches: (summed mean loss, real tokens, averaged metrics)."""
    model, dd = parts.model, parts.dd
    loss_sum = torch.zeros((), device=parts.device)
    step_tokens, extra = 0, {}
    for micro in range(cfg.grad_accum):
        batch = parts.loader.next_batch()
        sync = micro == cfg.grad_accum - 1
        no_sync = dd.enabled and not sync and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            loss, n, metrics = step_loss(model, batch, parts.autocast)
            loss = loss / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach()
        step_tokens += n
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
    return loss_sum, step_tokens, extra


def _out_of_memory(cfg, parts: LoopParts, step: int, message: str, desc: str) -> None:
    """Shrink the micro-batch after an out-of-memory error (same sequences per step), or raise a one-line error."""
    where = f"{parts.device}" + (f" (rank {parts.dd.rank})" if parts.dd.enabled else "")
    first_line = message.splitlines()[0]
    smaller = smaller_micro_batch(cfg.batch_size) if parts.fit_memory and not parts.dd.enabled else None
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
    old, per_step = cfg.batch_size, cfg.batch_size * cfg.grad_accum
    cfg.batch_size, cfg.grad_accum = smaller, cfg.grad_accum * (old // smaller)
    parts.loader.B = smaller
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
    if parts.dd.main:
        atomic_write_text(parts.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(
        f"lmforge {desc}: out of memory on {where} at micro-batch {old}; using micro-batch {smaller} x "
        f"{cfg.grad_accum} accumulation (the same {per_step} sequences per step)",
        file=sys.stderr,
    )


def train_loop(cfg, parts: LoopParts, start_step: int, tokens_seen: int, desc: str) -> dict:
    """Run optimizer steps start_step+1 .. cfg.max_steps; returns the last metrics record, with `step` (the last
    step done) and `stopped`: None when max_steps was reached, else "SIGINT", "SIGTERM" or "time_budget"."""
    model, optimizer, loader, dd, device = parts.model, parts.optimizer, parts.loader, parts.dd, parts.device
    # Clip everything the optimizer updates (a reward or value head too, not only the model).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step_loss = parts.step_loss or forward_loss
    step, last, skipped, stopped = start_step, {}, 0, None
    began = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not dd.main, desc=desc, dynamic_ncols=True,
               mininterval=1.0)  # fmt: skip
    with StopFlag() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, peak=cfg.lr, total=cfg.max_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule,
                       min_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            position, oom = loader.state_dict(), None
            try:
                loss_sum, step_tokens, extra = _accumulate(cfg, parts, step_loss)
            except torch.OutOfMemoryError as e:
                oom = str(e) or "out of memory"  # only the message: the traceback holds the step's activations
            if oom is not None:
                optimizer.zero_grad(set_to_none=True)
                _out_of_memory(cfg, parts, step + 1, oom, desc)  # raises unless the micro-batch could shrink
                loader.load_state_dict(position)  # the step again, from the same data, in smaller pieces
                continue
            if dd.enabled:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                t = torch.tensor(step_tokens, device=device)
                dist.all_reduce(t)
                step_tokens = int(t)
            loss_value = float(loss_sum)
            grad_norm = float("nan")
            _guard(cfg, extra, step + 1, parts.run_dir)
            if not math.isfinite(loss_value):
                if cfg.nan_policy == "stop":
                    raise LmforgeError(
                        f"loss is {loss_value} at step {step + 1}{_last_good(parts.run_dir)} (or set nan_policy=skip)"
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
            mfu = parts.flops_per_token * tps / (parts.peak_flops * dd.world_size) if parts.peak_flops else None
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                        "tokens_per_s": tps, "epoch": loader.epoch, "skipped": skipped, **extra}  # fmt: skip
                if mfu is not None:
                    last["mfu"] = mfu
                parts.logger.log(last)
            out_of_time = cfg.max_seconds > 0 and time.perf_counter() - began >= cfg.max_seconds
            final = step == cfg.max_steps or out_of_time or stop.signal is not None
            if final or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                parts.save(step, tokens_seen)  # before evaluation: an evaluation crash loses nothing
            if step == cfg.max_steps or out_of_time or (cfg.eval_every and step % cfg.eval_every == 0):
                parts.evaluate(step)
            if stop.signal or out_of_time:  # the caller says so (train.common.stop_exit_code, `lmforge run`)
                stopped = stop.signal or "time_budget"
                break
    bar.close()
    parts.logger.close()
    # `stopped` tells the caller (a command's exit code, `lmforge run`'s summary) that the run ended early.
    return {**last, "step": step, "stopped": stopped}
