"""Pieces every training stage shares: device choice, distributed setup, LR schedule, exit codes (the optimizer:
lmforge/train/optim.py).

Used by every training stage and by the shared loop (lmforge/train/loop.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA if present, else Apple MPS, else CPU. An unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device {name!r} requested, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError(f"device {name!r} requested, but MPS is not available here")
    return device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device, timeout_s: float = 1800.0) -> Dist:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); no-op otherwise.

    A group that cannot be joined within `timeout_s` (an endpoint nobody listens on, a node that never started) is a
    one-line error naming the address, not a hang or a traceback.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if d.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        hint = "is the rendezvous endpoint reachable and every node started? see README: from laptop to cluster"
        # Rank 0 hosts the store itself unless torchrun's agent does; everyone else first waits for it to listen,
        # so an address nobody serves is this one line rather than c10d's retries with C++ backtraces.
        if d.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _wait_for_listener(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "0")),
                               timeout_s, f"cannot reach the process group's store at {where} as rank {d.rank} of "
                               f"{d.world_size} within {timeout_s:g} s ({hint})")  # fmt: skip
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, TimeoutError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
            raise LmforgeError(
                f"cannot join the process group at {where} as rank {d.rank} of {d.world_size} within "
                f"{timeout_s:g} s: {str(e).splitlines()[0] if str(e) else type(e).__name__} ({hint})"
            ) from None
    return d


def _wait_for_listener(host: str, port: int, timeout_s: float, message: str) -> None:
    """Return once `host:port` accepts a TCP connection; LmforgeError(message) after `timeout_s` without one."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise LmforgeError(message) from None
            time.sleep(0.2)


def teardown_distributed() -> None:
    if dist.is_initialized():
        # Wait for every rank before tearing down: a rank that destroys its gloo group while another is still
        # in a collective (rank 0 saving the last checkpoint) was seen to abort at exit ("terminate called
        # without an active exception", SIGABRT) on a loaded 2-core machine.
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS each step.

    A CPU training step allocates and frees the same large activations every step; with
    glibc's defaults each one is a fresh mmap, page-faulted in again (~140k faults per
    tiny-model step). Raising the mmap and trim thresholds (what MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ would do at start-up) made training ~25% faster here. A no-op
    where glibc is absent; returns whether it applied.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def stop_exit_code(result: dict, stage: str) -> int:
    """A training command's exit status from its stage's result (`stopped`, from train_loop), with a status line.

    Stopped by a signal (Ctrl-C, SIGTERM): 128 + the signal number (130, 143), as shells expect of a program a signal
    ended, so `lmforge pretrain ... && lmforge sft ...` stops there. Stopped at the time budget (--max-seconds),
    asked for: 0. Either way the checkpoint is saved and rerunning the same command resumes.
    """
    stopped = result.get("stopped")
    if stopped is None:
        return 0
    why = "at the time budget (--max-seconds)" if stopped == "time_budget" else f"by {stopped}"
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same; one line is enough
        print(f"lmforge {stage}: stopped {why} after step {result.get('step')}; checkpoint saved, "
              "rerun the same command to resume", file=sys.stderr)  # fmt: skip
    return 0 if stopped == "time_budget" else 128 + signal.Signals[stopped].value


def smaller_micro_batch(batch_size: int) -> int | None:
    """The micro-batch to retry with after running out of memory: the largest divisor of batch_size that is at
    most half of it (so batch_size / it more accumulation steps keep the sequences per step), or None at 1."""
    for b in range(batch_size // 2, 0, -1):
        if batch_size % b == 0:
            return b
    return None


def launched_world_size() -> int:
    """Processes in this run as torchrun launched it (1 without torchrun); readable before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def adopt_saved_batch_split(cfg, saved: dict, where, saved_world: int = 1, world: int = 1):
    """Resume check for the batch: the sequences per optimizer step must be the checkpoint's; returns `cfg` with the
    micro-batch split that keeps them on `world` processes.

    Same world size: the checkpoint's own split. A run whose micro-batch was shrunk to fit memory saved the split it
    used, so rerunning the original command resumes with that split (the same losses as the run so far).
    Another world size (a run saved by N processes resumed on M, checkpoints hold whole tensors): the checkpoint's
    sequences per step G are split as G / M per process, micro-batch at most the asked batch_size, the rest
    accumulated; the loaders count positions over all processes, so the steps see the same rows as before.
    """
    b, a = int(saved.get("batch_size", 0)), int(saved.get("grad_accum", 0))
    if world != saved_world:
        total = b * a * saved_world
        if total % world:
            raise LmforgeError(
                f"{where}: cannot resume on {world} processes: the run takes {total} sequences per step "
                f"(saved by {saved_world} processes), which do not split evenly over {world}"
            )
        per_rank = total // world
        micro = max(d for d in range(1, min(cfg.batch_size, per_rank) + 1) if per_rank % d == 0)
        if os.environ.get("RANK", "0") == "0":
            print(f"lmforge: resuming a run of {saved_world} process(es) on {world}: micro-batch {micro} x "
                  f"{per_rank // micro} accumulation per process (the same {total} sequences per step)",
                  file=sys.stderr)  # fmt: skip
        return dataclasses.replace(cfg, batch_size=micro, grad_accum=per_rank // micro)
    if b * a != cfg.batch_size * cfg.grad_accum:
        raise LmforgeError(
            f"{where}: cannot resume: {b * a} sequences per step (batch_size {b} x grad_accum {a}) in the checkpoint "
            f"but {cfg.batch_size * cfg.grad_accum} now (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum})"
        )
    if (b, a) == (cfg.batch_size, cfg.grad_accum):
        return cfg
    print(f"lmforge: resuming with the checkpoint's micro-batch {b} x {a} accumulation", file=sys.stderr)
    return dataclasses.replace(cfg, batch_size=b, grad_accum=a)


def lr_at(step: int, *, peak: float, total: int, warmup: int, schedule: str, min_ratio: float, decay_fraction: float):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD.

    WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): hold the peak, then decay
    linearly to min over the last `decay_fraction` of the steps.
    """
    floor = peak * min_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_fraction))
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, total - decay_start)
        return peak - (peak - floor) * min(1.0, frac)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))


# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


CHECKPOINTING_AUTO_PARAMS = 50_000_000  # `activation_checkpointing: auto` turns it on from this model size up


def checkpointing_on(setting: str, params: int) -> bool:
    """What `activation_checkpointing` (auto, on, off) resolves to for a model of `params` parameters."""
    return setting == "on" or (setting == "auto" and params >= CHECKPOINTING_AUTO_PARAMS)


def set_activation_checkpointing(model: torch.nn.Module, setting: str) -> tuple[bool, int]:
    """Apply `activation_checkpointing` (auto, on, off) to every lmforge Transformer or Encoder inside `model` (a DDP/FSDP
    wrapper, a policy with a value head); returns (on, parameters of the largest). auto: on from 50M parameters."""
    from lmforge.model.encoder import Encoder
    from lmforge.model.transformer import Transformer

    found = [m for m in model.modules() if isinstance(m, (Transformer, Encoder))]
    size = max((sum(p.numel() for p in m.parameters()) for m in found), default=0)
    on = checkpointing_on(setting, size)
    for m in found:
        m.checkpointing = on
    return on, size


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """The process's peak memory so far: resident set size on CPU (what gets a process killed), and on CUDA also
    the most the allocator held. For metrics records and a run's closing line."""
    import resource

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux (bytes on macOS)
    out = {"peak_rss_mb": round(rss_kb / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
    return out
