"""What every stage that starts from a trained model shares: config fields, run folder, resume, saving.

    run = FinetuneRun(cfg, stage="dpo", resume_fields=("beta", ...))   # loads the base, checks a resume
    run.make_trainable()                                                 # LoRA or freezing, resumed weights
    optimizer = run.optimizer()                                          # AdamW, resumed state
    save = run.saver(loader)                                             # save(step, tokens_seen)

SFT, reward modelling, DPO and GRPO each keep their own data, loss and loop parts in their
own file; this module holds only the setup they would otherwise copy: load the base
(`--model`: a run, checkpoint or imported folder, LoRA runs merged), copy its tokenizer into
the run so checkpoints stand alone, write the resolved config, and on a rerun check that the
settings a resume depends on did not change, then restore weights, optimizer and RNG. A LoRA
run saves only its adapter, tied to the base's weight fingerprint. Extra trained tensors (a
reward or value head) are saved next to the weights as `head.safetensors`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lmforge.config import apply_updates, require, to_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_json, atomic_write_text
from lmforge.model.lora import LoraConfig, apply_lora, load_lora_tensors, lora_tensors
from lmforge.model.transformer import param_part
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import adopt_saved_batch_split, make_optimizer, pick_device, stop_exit_code

FREEZABLE = ("embeddings", "attention", "mlp", "norms")
# Must match to resume (and the sequences per step: adopt_saved_batch_split keeps the checkpoint's micro-batch split).
COMMON_RESUME = ("base", "lora", "lora_rank", "lora_targets", "freeze", "seq_len", "seed")


@dataclass
class FinetuneConfig:
    """Fields shared by sft, reward, dpo and grpo. Each field's comment is its help text."""

    base: str = ""  # the model to start from: run, checkpoint or `lmforge import` folder
    out: str = ""  # run folder
    lora: bool = False  # train low-rank adapters instead of all weights
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated linear layer names (attention by default)
    freeze: str = ""  # full fine-tuning: comma-separated parts kept fixed (embeddings, attention, mlp, norms)
    batch_size: int = 8  # sequences (or packed rows, or pairs) per micro-batch per process
    seq_len: int = 0  # tokens per sequence (0 = the model's max_seq_len, at most 1024); longer ones are cut
    grad_accum: int = 1
    max_steps: int = 200
    max_seconds: float = 0.0  # time budget for this invocation; 0 = none
    lr: float = 1e-4  # peak LR (LoRA usually wants ~1e-4..1e-3, full fine-tuning ~1e-5..1e-4)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine or wsd
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50  # 0 = only before and after
    eval_batches: int = 20  # cap on validation batches
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 autocast on GPU), float32, bfloat16
    nan_policy: str = "stop"

    def validate(self):
        checks = [
            (bool(self.base), "needs --model (a run, checkpoint or imported model folder)"),
            (self.batch_size >= 1 and self.seq_len >= 0 and self.grad_accum >= 1,
             "batch_size, grad_accum >= 1, seq_len >= 0"),
            (self.max_steps >= 1 and self.lr > 0, "max_steps >= 1 and lr > 0"),
            (self.schedule in ("cosine", "wsd"), "schedule must be cosine or wsd"),
            (self.nan_policy in ("stop", "skip"), "nan_policy must be stop or skip"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (not (self.lora and self.freeze), "freeze is for full fine-tuning; --lora already freezes the base"),
        ]  # fmt: skip
        require(checks)
        bad = sorted(set(self.freeze_parts) - set(FREEZABLE))
        if bad:
            raise LmforgeError(f"config: freeze must list parts among {', '.join(FREEZABLE)}, got {bad}")
        if self.lora:
            self.lora_config.validate()
        return self

    @property
    def freeze_parts(self) -> list[str]:
        return [p.strip() for p in self.freeze.split(",") if p.strip()]

    @property
    def lora_config(self) -> LoraConfig:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets)


def add_common_args(p: argparse.ArgumentParser, config_name: str) -> None:
    """The flags every fine-tuning command takes (plus `--set` for any config field)."""
    p.add_argument("--model", help="run, checkpoint or imported model folder to start from")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--config", help=f"YAML recipe with {config_name} fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters only")
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--max-seconds", type=float, dest="max_seconds")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")


def add_stage_command(subparsers, name: str, help: str, config_cls, run, extra: dict[str, str]) -> None:
    """`lmforge NAME`: the shared flags plus `extra` ({field: help}, e.g. --data), resolved into
    `config_cls` (defaults <- --config <- flags <- --set) and handed to `run(cfg)`."""
    from lmforge.config import load_yaml, parse_set

    p = subparsers.add_parser(name, help=help)
    add_common_args(p, config_cls.__name__)
    for field_name, field_help in extra.items():
        p.add_argument(f"--{field_name.replace('_', '-')}", dest=field_name, help=field_help)

    def main(args: argparse.Namespace) -> int:
        recipe = load_yaml(args.config) if args.config else {}
        flags = {**common_flags(args), **{k: getattr(args, k) for k in extra}}
        return stop_exit_code(run(resolve(config_cls, recipe, flags, parse_set(args.set))), name)

    p.set_defaults(func=main)


def common_flags(args: argparse.Namespace) -> dict:
    names = ("lora", "max_steps", "max_seconds", "batch_size", "seq_len", "lr", "seed", "device", "out")
    return {"base": args.model, **{k: getattr(args, k) for k in names}}


def resolve(cls, recipe: dict | None, flags: dict, sets: dict):
    """A config of dataclass `cls`: defaults <- recipe <- plain flags (non-None) <- --set."""
    cfg = cls()
    for layer in (recipe or {}, {k: v for k, v in flags.items() if v is not None}, sets):
        apply_updates(cfg, layer)
    return cfg.validate()


def freeze(model, parts: list[str]) -> None:
    """Hold parts fixed; "embeddings" covers the input table and the output head."""
    kinds = {"embeddings": ("embedding", "head"), "attention": ("attention",), "mlp": ("mlp",), "norms": ("norms",)}
    hold = {kind for part in parts for kind in kinds[part]}
    for name, p in model.named_parameters():
        if param_part(name) in hold:
            p.requires_grad_(False)


class FinetuneRun:
    """The run folder of one fine-tuning stage: base model, tokenizer copy, resume, saving."""

    def __init__(self, cfg: FinetuneConfig, stage: str, resume_fields: tuple[str, ...] = ()):
        self.cfg, self.stage = cfg, stage
        self.run_dir = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.model, self.base_ckpt, base_meta = ckpt.load_model(cfg.base)
        if cfg.seq_len == 0:
            cfg.seq_len = min(self.model.cfg.max_seq_len, 1024)
        if cfg.seq_len > self.model.cfg.max_seq_len:
            raise LmforgeError(
                f"config: seq_len ({cfg.seq_len}) exceeds the model's max_seq_len ({self.model.cfg.max_seq_len})"
            )
        existing = ckpt.list_checkpoints(self.run_dir)
        self.resume_from = existing[-1] if existing else None
        self.meta = ckpt.read_meta(self.resume_from) if existing else None
        self.base_fingerprint = ckpt.file_fingerprint(ckpt.weights_path(self.base_ckpt, base_meta))
        if self.meta is not None:
            saved = self.meta["train_config"]
            for key in COMMON_RESUME + resume_fields:
                if saved.get(key) != getattr(cfg, key):
                    raise LmforgeError(
                        f"{self.resume_from}: cannot resume: {key} is {saved.get(key)!r} in the checkpoint "
                        f"but {getattr(cfg, key)!r} now (use a new --out, or the same config)"
                    )
            adopt_saved_batch_split(cfg, saved, self.resume_from)
            if self.meta["base"]["fingerprint"] != self.base_fingerprint:
                raise LmforgeError(f"{self.resume_from}: cannot resume: the base model {cfg.base} changed since")
        self.tokenizer_dir = ckpt.tokenizer_dir(self.base_ckpt, base_meta)
        self.start_step = self.meta["step"] if self.meta else 0
        self.tokens_seen = self.meta["tokens_seen"] if self.meta else 0
        self.use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")

    def write_run_files(self, reports: dict[str, dict] | None = None) -> None:
        """Copy the tokenizer into the run (checkpoints stand alone), write the resolved config and `reports`
        ({file name: JSON}, e.g. data_report.json).

        The first write to the run folder: a stage calls it only once its inputs (base model, data, task, reward
        model) are read and checked, so a bad input leaves no half-made run behind.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dst = self.run_dir / "tokenizer"
        if not dst.exists():
            tmp = self.run_dir / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.tokenizer_dir, tmp)
            tmp.replace(dst)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        for name, report in (reports or {}).items():
            atomic_write_json(self.run_dir / name, report)

    def make_trainable(self, head: torch.nn.Module | None = None) -> tuple[int, int]:
        """Apply LoRA or freezing, restore resumed weights (and `head`); returns (trainable, total) parameters."""
        cfg, model = self.cfg, self.model
        torch.manual_seed(cfg.seed)
        if cfg.lora:
            apply_lora(model, cfg.lora_config)
        elif cfg.freeze_parts:
            freeze(model, cfg.freeze_parts)
        self.head = head
        if self.meta is not None:
            if cfg.lora:
                where = self.resume_from / "adapter.safetensors"
                load_lora_tensors(model, ckpt.load_tensors(where), str(where))
            else:
                ckpt.load_model_weights(model, self.resume_from)
            if head is not None:
                head.load_state_dict(ckpt.load_tensors(self.resume_from / "head.safetensors"))
        model.to(self.device)
        if head is not None:
            head.to(self.device)
        params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
        trainable = sum(p.numel() for p in params if p.requires_grad)
        if trainable == 0:
            raise LmforgeError("config: nothing left to train (every part is frozen)")
        return trainable, sum(p.numel() for p in params)

    def optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        modules = torch.nn.ModuleList([self.model] + ([self.head] if self.head is not None else []))
        optimizer = make_optimizer(modules, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device)
        if self.meta is not None:
            try:
                optimizer.load_state_dict(ckpt.load_training_state(self.resume_from))
            except (ValueError, KeyError, RuntimeError) as e:
                raise LmforgeError(
                    f"{self.resume_from}: optimizer state does not fit this run ({str(e).splitlines()[0]})"
                ) from None
        return optimizer

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def saver(self, optimizer, loader, extra_meta: dict | None = None):
        """save(step, tokens_seen): weights (or adapter), head, optimizer, RNG and loader position."""
        cfg, model = self.cfg, self.model
        base_info = {"path": str(Path(self.base_ckpt).resolve()), "fingerprint": self.base_fingerprint}
        tok_meta = {"dir": "../../tokenizer", "hash": tokenizer_hash(self.tokenizer_dir)}

        def save(step: int, tokens_seen: int) -> None:
            opt_tensors, opt_meta = ckpt.optimizer_tensors(optimizer.state_dict())
            meta = {"model_config": model.cfg.to_dict(), "train_config": to_dict(cfg), "tokenizer": tok_meta,
                    "base": base_info, "loader": loader.state_dict(), "tokens_seen": tokens_seen, "stage": self.stage,
                    **(extra_meta or {})}  # fmt: skip
            if cfg.lora:
                meta["adapter"] = cfg.lora_config.to_dict()
                tensors, name = lora_tensors(model), "adapter.safetensors"
            else:
                tensors, name = ckpt.model_tensors(model.state_dict(), model.cfg.tie_embeddings), "model.safetensors"
            extra = None
            if self.head is not None:
                extra = {
                    "head.safetensors": {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
                }
            ckpt.save_checkpoint(self.run_dir, step, tensors, meta, opt_tensors, opt_meta, cfg.keep_last, name, extra)

        return save

    def train(self, optimizer, loader, evaluate, dd, step_loss=None, save=None) -> dict:
        """Evaluate at step 0 (fresh runs), run the shared step loop, return its last record + "before"/"after".

        `evaluate(step)` returns a record (logged here) or None; `save(step, tokens_seen)` defaults to
        `saver(optimizer, loader)` on the main process.
        """
        from lmforge.model.transformer import flops_per_token
        from lmforge.train.common import peak_flops
        from lmforge.train.loop import LoopParts, train_loop
        from lmforge.train.metrics import MetricsLogger

        logger = MetricsLogger(self.run_dir, resume_step=self.start_step if self.meta else None, enabled=dd.main)
        if save is None:
            ckpt_save = self.saver(optimizer, loader)

            def save(step: int, tokens_seen: int) -> None:
                if dd.main:
                    ckpt_save(step, tokens_seen)

        evals: list[dict] = []

        def logged_eval(step: int) -> dict | None:
            rec = evaluate(step)
            if rec is not None:
                rec = {"step": step, **rec}
                logger.log(rec)
                evals.append(rec)
            return rec

        before = logged_eval(0) if self.meta is None else None
        parts = LoopParts(self.model, optimizer, loader, save, logged_eval, logger, self.device, dd, self.autocast,
                          flops_per_token(self.model.cfg, self.cfg.seq_len), peak_flops(self.device), self.run_dir,
                          step_loss=step_loss)  # fmt: skip
        result = dict(train_loop(self.cfg, parts, self.start_step, self.tokens_seen, desc=self.stage))
        if before:
            result["before"] = before
        if evals and evals[-1]["step"] > 0:
            result["after"] = evals[-1]
        return result

    def say(self, message: str) -> None:
        print(f"lmforge {self.stage}: {message}", file=sys.stderr)
