"""What every stage that starts from a trained model shares: config fields, run folder, resume, saving.

    run = FinetuneRun(cfg, stage="dpo", resume_fields=("beta", ...))   # loads the base, checks a resume
    cfg = run.cfg                                                        # resolved: seq_len, resumed batch split
    run.make_trainable()                                                 # LoRA, adapters or freezing, resumed weights
    optimizer = run.optimizer()                                          # AdamW, resumed state
    hooks = run.hooks(optimizer, loader, evaluate)                       # checkpoints, metrics, run folder
    return train_loop(cfg, model, optimizer, step_fn, loader, hooks, **run.progress(), desc="dpo")

SFT, reward modelling, DPO, GRPO and PPO each keep their own data, step and evaluation in
their own file; this module holds only the setup they would otherwise copy: load the base
(`--model`: a run, checkpoint or imported folder, LoRA runs merged; a bottleneck-adapter run
cannot be a base, as its adapters do not merge), copy its tokenizer into
the run so checkpoints stand alone, write the resolved config, and on a rerun check that the
settings a resume depends on did not change, then restore weights, optimizer and RNG. A LoRA
(`--lora`) or bottleneck-adapter (`--adapter`, lmforge/model/bottleneck.py) run saves only its
adapter, tied to the base's weight fingerprint. Extra trained tensors (a reward or value head)
are saved next to the weights as `head.safetensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.cli_config import add_config_command
from lmforge.config import LoopConfig, require, save_config, to_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_json
from lmforge.model.bottleneck import AdapterConfig, adapter_tensors, apply_adapters, load_adapter_tensors
from lmforge.model.lora import LoraConfig, apply_lora, load_lora_tensors, lora_tensors
from lmforge.model.sizes import param_part
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import adopt_saved_batch_split, launched_world_size, pick_device, stop_exit_code
from lmforge.train.loop import Hooks, refit_loader
from lmforge.train.metrics import MetricsLogger
from lmforge.train.optim import make_optimizer

FREEZABLE = ("embeddings", "attention", "mlp", "norms")
# Must match to resume (and the sequences per step: adopt_saved_batch_split keeps the checkpoint's micro-batch split).
# A key a checkpoint lacks was written before that field existed: the run had the field's default.
COMMON_RESUME = ("base", "lora", "lora_rank", "lora_targets", "adapter", "adapter_size", "freeze", "seq_len", "seed")


@dataclass(frozen=True)
class FinetuneConfig(LoopConfig):
    """Fields shared by sft, reward, dpo, grpo and ppo (the loop's, with fine-tuning defaults, plus these)."""

    base: str = ""  # the model to start from: run, checkpoint or `lmforge import` folder
    out: str = ""  # run folder (rerun the same command to resume)
    lora: bool = False  # train low-rank adapters instead of all weights
    lora_rank: int = 8  # rank r of each adapter
    lora_alpha: float = 16.0  # adapter scale: the update is alpha / r * B A
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated linear layer names (attention by default)
    adapter: bool = False  # train Houlsby bottleneck adapters (after attention and MLP) instead of all weights
    adapter_size: int = 64  # bottleneck width m of each adapter
    freeze: str = ""  # full fine-tuning: comma-separated parts kept fixed (embeddings, attention, mlp, norms)
    batch_size: int = 8  # sequences (or packed rows, or pairs) per micro-batch per process
    seq_len: int = 0  # tokens per sequence (0 = the model's max_seq_len, at most 1024); longer ones are cut
    max_steps: int = 200  # optimizer steps in total (the LR schedule spans them)
    lr: float = 1e-4  # peak LR (LoRA and adapters usually want ~1e-4..1e-3, full fine-tuning ~1e-5..1e-4)
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on matrices (not norms, biases)
    eval_every: int = 50  # steps between evaluations; 0 = only before the first step and after the last

    def validate(self):
        checks = [
            *self.loop_checks(),
            (bool(self.base), "needs --model (a run, checkpoint or imported model folder)"),
            (not (self.lora and self.adapter), "--lora and --adapter are two kinds of adapter: pick one"),
            (not (self.lora and self.freeze), "freeze is for full fine-tuning; --lora already freezes the base"),
            (not (self.adapter and self.freeze), "freeze is for full fine-tuning; --adapter already freezes the base"),
        ]  # fmt: skip
        require(checks)
        bad = sorted(set(self.freeze_parts) - set(FREEZABLE))
        if bad:
            raise LmforgeError(f"config: freeze must list parts among {', '.join(FREEZABLE)}, got {bad}")
        if self.lora:
            self.lora_config.validate()
        if self.adapter:
            self.adapter_config.validate()
        return self

    @property
    def peft(self) -> bool:
        """Parameter-efficient: only adapters (LoRA or bottleneck) train on a frozen base, so the starting model is
        the policy with its adapters off (`adapters_disabled`): the stages keep no reference copy."""
        return self.lora or self.adapter

    @property
    def freeze_parts(self) -> list[str]:
        return [p.strip() for p in self.freeze.split(",") if p.strip()]

    @property
    def lora_config(self) -> LoraConfig:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets)

    @property
    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(size=self.adapter_size)


def add_stage_command(subparsers, name: str, help: str, config_cls, run, description: str) -> None:
    """`lmforge NAME` for a fine-tuning stage: a flag per field of `config_cls` (`base` is --model), run(cfg)."""
    add_config_command(subparsers, name, help, config_cls, run, rename={"base": "model"}, description=description,
                       exit_code=stop_exit_code)  # fmt: skip


def freeze(model, parts: list[str]) -> None:
    """Hold parts fixed; "embeddings" covers the input table and the output head."""
    kinds = {"embeddings": ("embedding", "head"), "attention": ("attention",), "mlp": ("mlp",), "norms": ("norms",)}
    hold = {kind for part in parts for kind in kinds[part]}
    for name, p in model.named_parameters():
        if param_part(name) in hold:
            p.requires_grad_(False)


class FinetuneRun:
    """The run folder of one fine-tuning stage: base model, tokenizer copy, resume, saving."""

    def __init__(self, cfg: FinetuneConfig, stage: str, resume_fields: tuple[str, ...] = (), encoder_ok: bool = False):
        """Load the base and check a resume; `self.cfg` is `cfg` resolved (what the stage runs with). `encoder_ok`:
        the stage takes an encoder base too (finetune-cls); the others refuse one in a line."""
        self.stage = stage
        self.run_dir = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.model, self.base_ckpt, base_meta = ckpt.load_model(cfg.base, for_training=True, encoder_ok=encoder_ok)
        if cfg.seq_len == 0:
            cfg = dataclasses.replace(cfg, seq_len=min(self.model.cfg.max_seq_len, 1024))
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
            defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
            for key in COMMON_RESUME + resume_fields:
                was = saved.get(key, defaults.get(key))  # absent: written before the field existed
                if was != getattr(cfg, key):
                    raise LmforgeError(
                        f"{self.resume_from}: cannot resume: {key} is {was!r} in the checkpoint "
                        f"but {getattr(cfg, key)!r} now (use a new --out, or the same config)"
                    )
            world = launched_world_size()
            cfg = adopt_saved_batch_split(cfg, saved, self.resume_from, self.meta.get("world_size", world), world)
            if self.meta["base"]["fingerprint"] != self.base_fingerprint:
                raise LmforgeError(f"{self.resume_from}: cannot resume: the base model {cfg.base} changed since")
        self.cfg = cfg
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
        save_config(self.cfg, self.run_dir / "config.yaml")
        for name, report in (reports or {}).items():
            atomic_write_json(self.run_dir / name, report)

    def make_trainable(self, head: torch.nn.Module | None = None) -> tuple[int, int]:
        """Apply LoRA, adapters or freezing, restore resumed weights (and `head`); returns (trainable, total)
        parameters."""
        cfg, model = self.cfg, self.model
        torch.manual_seed(cfg.seed)
        if cfg.lora:
            apply_lora(model, cfg.lora_config)
        elif cfg.adapter:
            apply_adapters(model, cfg.adapter_config)
        elif cfg.freeze_parts:
            freeze(model, cfg.freeze_parts)
        self.head = head
        if self.meta is not None:
            where = self.resume_from / "adapter.safetensors"
            if cfg.lora:
                load_lora_tensors(model, ckpt.load_tensors(where), str(where))
            elif cfg.adapter:
                load_adapter_tensors(model, ckpt.load_tensors(where), str(where))
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
        optimizer = make_optimizer(
            modules, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device, cfg.optimizer
        )
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

    def saver(self, optimizer, loader, main: bool = True, extra_meta: dict | None = None):
        """save(step, tokens_seen, cfg): weights (or adapter), head, optimizer, RNG and loader position (main
        process only: every rank holds the same weights); `extra_meta` goes into meta.json too (distill's teacher)."""
        model = self.model
        base_info = {"path": str(Path(self.base_ckpt).resolve()), "fingerprint": self.base_fingerprint}
        tok_meta = {"dir": "../../tokenizer", "hash": tokenizer_hash(self.tokenizer_dir)}

        def save(step: int, tokens_seen: int, cfg: FinetuneConfig) -> None:
            if not main:
                return
            opt_tensors, opt_meta = ckpt.optimizer_tensors(optimizer.state_dict())
            meta = {"model_config": model.cfg.to_dict(), "train_config": to_dict(cfg), "tokenizer": tok_meta,
                    "base": base_info, "loader": loader.state_dict(), "tokens_seen": tokens_seen, "stage": self.stage,
                    "world_size": launched_world_size(),
                    **(extra_meta or {})}  # fmt: skip
            if cfg.lora:
                meta["adapter"] = cfg.lora_config.to_dict()
                tensors, name = lora_tensors(model), "adapter.safetensors"
            elif cfg.adapter:
                meta["adapter"] = cfg.adapter_config.to_dict()  # "kind": "bottleneck": it loads unmerged
                tensors, name = adapter_tensors(model), "adapter.safetensors"
            else:
                tensors, name = ckpt.model_tensors(model.state_dict(), model.cfg.tie_embeddings), "model.safetensors"
            extra = None
            if self.head is not None:
                extra = {
                    "head.safetensors": {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
                }
            ckpt.save_checkpoint(self.run_dir, step, tensors, meta, opt_tensors, opt_meta, cfg.keep_last, name, extra)

        return save

    def hooks(self, optimizer, batches, evaluate, dd, *, save=None, check=None, refit: bool = False) -> Hooks:
        """The loop's hooks for this run: metrics.jsonl/TensorBoard (cut back to the resumed step), `save`
        (default: `saver`), the stage's `evaluate` and `check`, and with `refit` (a loader with a micro-batch `B`)
        the out-of-memory refit."""
        from lmforge.model.sizes import flops_per_token

        return Hooks(
            save=save or self.saver(optimizer, batches, dd.main),
            evaluate=evaluate,
            logger=MetricsLogger(self.run_dir, resume_step=self.start_step if self.meta else None, enabled=dd.main),
            run_dir=self.run_dir,
            check=check,
            refit=refit_loader(batches, self.run_dir, dd.main) if refit else None,
            flops_per_token=flops_per_token(self.model.cfg, self.cfg.seq_len),
        )

    def progress(self) -> dict:
        """Where the loop starts: {"start_step", "tokens_seen"} (0 for a fresh run, the checkpoint's on resume)."""
        return {"start_step": self.start_step, "tokens_seen": self.tokens_seen}

    def say(self, message: str) -> None:
        print(f"lmforge {self.stage}: {message}", file=sys.stderr)
