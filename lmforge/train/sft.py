"""Stage 2: supervised fine-tuning on conversations, loss on the answers only (full or LoRA).

    lmforge sft --model runs/demo --data chatterbot --out runs/demo-sft --max-steps 300
    lmforge sft --model models/smollm2 --data chitchat --out runs/smol-lora --lora --set lora_rank=16
    lmforge sft --model runs/demo --data my_chats.jsonl --out runs/x --set freeze=embeddings

--model is a pretraining run, a checkpoint, an `lmforge import` folder or another SFT run;
--data a JSONL file/folder (Alpaca, ShareGPT or OpenAI `messages` records) or a packaged
set (`chitchat`, `chatterbot`). Conversations are rendered with the model's own chat
template; every assistant turn (and its turn-end token) is a loss target, nothing else is.
Conversations are packed into rows without attention or positions crossing between them
(lmforge/chat/packing.py). A held-out split gives the validation loss on answer tokens,
logged before the first step and at every evaluation.

The run folder works like a pretraining run: rerunning resumes exactly, SIGTERM
checkpoints and exits, metrics.jsonl and TensorBoard hold the curves. A `--lora` run
stores only the adapter (checkpoints/step_N/adapter.safetensors, tied to the base's
fingerprint); `lmforge generate/chat/export` load it onto the base and merge it.
At the end, `samples.txt` holds greedy replies to held-out prompts and whether each
ended at the turn-end token.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from lmforge.config import apply_updates, load_yaml, parse_set, to_dict
from lmforge.errors import LmforgeError
from lmforge.eval.loss import evaluate_loss
from lmforge.fileio import atomic_write_json, atomic_write_text
from lmforge.model.lora import ALL_LINEAR, LoraConfig, apply_lora, load_lora_tensors, lora_tensors
from lmforge.model.transformer import flops_per_token, param_part
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import make_optimizer, peak_flops, pick_device, setup_distributed, teardown_distributed
from lmforge.train.loop import LoopParts, train_loop
from lmforge.train.metrics import MetricsLogger

FREEZABLE = ("embeddings", "attention", "mlp", "norms")
RESUME_FIELDS = ("base", "lora", "lora_rank", "lora_targets", "batch_size", "seq_len", "grad_accum", "seed", "freeze")


@dataclass
class SftConfig:
    """Instruction tuning (stage 2). Each field's comment is its help text."""

    base: str = ""  # the model to tune: run, checkpoint or `lmforge import` folder
    data: str = ""  # conversations: JSONL file/folder, or `chitchat` / `chatterbot`
    data_format: str = "auto"  # auto, alpaca, sharegpt, messages
    out: str = ""  # run folder
    system: str = ""  # system prompt added to conversations that have none ("" = none)
    val_fraction: float = 0.05  # held-out conversations for the validation loss
    lora: bool = False  # train low-rank adapters instead of all weights
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(ALL_LINEAR)  # comma-separated linear layer names
    freeze: str = ""  # full fine-tuning: comma-separated parts kept fixed (embeddings, attention, mlp, norms)
    batch_size: int = 8  # packed rows per micro-batch per process
    seq_len: int = 0  # tokens per packed row (0 = the model's max_seq_len, at most 1024); longer ones are cut
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
    samples: int = 8  # held-out prompts answered greedily into samples.txt at the end
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 autocast on GPU), float32, bfloat16
    nan_policy: str = "stop"
    parallel: str = "ddp"

    def validate(self) -> SftConfig:
        checks = [
            (bool(self.base), "sft needs --model (a run, checkpoint or imported model folder)"),
            (bool(self.data), "sft needs --data (a JSONL file/folder, or chitchat / chatterbot)"),
            (self.batch_size >= 1 and self.seq_len >= 0 and self.grad_accum >= 1, "batch_size, grad_accum >= 1, seq_len >= 0"),
            (self.max_steps >= 1 and self.lr > 0, "max_steps >= 1 and lr > 0"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.schedule in ("cosine", "wsd"), "schedule must be cosine or wsd"),
            (self.nan_policy in ("stop", "skip"), "nan_policy must be stop or skip"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (self.parallel == "ddp", "sft supports parallel=ddp"),
            (not (self.lora and self.freeze), "freeze is for full fine-tuning; --lora already freezes the base"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"config: {message}")
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


def register(subparsers) -> None:
    p = subparsers.add_parser("sft", help="instruction-tune a model on conversations (answer-only loss; --lora)")
    p.add_argument("--model", help="run, checkpoint or imported model folder")
    p.add_argument("--data", help="JSONL file/folder, or a packaged set: chitchat, chatterbot")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="YAML recipe with SftConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters only")
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--max-seconds", type=float, dest="max_seconds")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.set_defaults(func=_main)


def resolve_sft_config(recipe: dict | None, flags: dict, sets: dict) -> SftConfig:
    """SftConfig: defaults <- recipe <- plain flags (non-None) <- --set."""
    cfg = SftConfig()
    for layer in (recipe or {}, {k: v for k, v in flags.items() if v is not None}, sets):
        apply_updates(cfg, layer)
    return cfg.validate()


def _main(args: argparse.Namespace) -> int:
    recipe = load_yaml(args.config) if args.config else {}
    flags = {k: getattr(args, k) for k in ("data", "lora", "max_steps", "max_seconds", "batch_size", "seq_len", "lr")}
    flags.update(base=args.model, seed=args.seed, device=args.device, out=args.out)
    sft(resolve_sft_config(recipe, flags, parse_set(args.set)))
    return 0


def sft(cfg: SftConfig) -> dict:
    """Run (or resume) supervised fine-tuning; returns {"val_loss_before", "val_loss_after", ...}."""
    device = pick_device(cfg.device)
    dd = setup_distributed(device)
    try:
        return _sft(cfg, Path(cfg.out), device, dd)
    finally:
        teardown_distributed()


def _freeze(model, parts: list[str]) -> None:
    """Full fine-tuning with parts held fixed; "embeddings" covers the input table and the output head."""
    frozen = {"embeddings": ("embedding", "head"), "attention": ("attention",), "mlp": ("mlp",), "norms": ("norms",)}
    hold = {kind for part in parts for kind in frozen[part]}
    for name, p in model.named_parameters():
        if param_part(name) in hold:
            p.requires_grad_(False)


def _check_resume(meta: dict, cfg: SftConfig, where: Path) -> None:
    saved = meta["train_config"]
    for key in RESUME_FIELDS:
        if saved.get(key) != getattr(cfg, key):
            raise LmforgeError(
                f"{where}: cannot resume: {key} is {saved.get(key)!r} in the checkpoint but {getattr(cfg, key)!r} now"
            )


def _prepare_data(cfg: SftConfig, tok_dir: Path, run_dir: Path, main: bool):
    from lmforge.chat.datasets import load_conversations, split_conversations, summarize
    from lmforge.chat.packing import encode_conversations
    from lmforge.chat.template import ChatFormat

    fmt = ChatFormat(tok_dir)
    cs = load_conversations(cfg.data, cfg.data_format, system=cfg.system or None)
    train_convs, val_convs = split_conversations(cs.conversations, cfg.val_fraction, cfg.seed)
    train, train_report = encode_conversations(fmt, train_convs, cfg.seq_len)
    val, val_report = encode_conversations(fmt, val_convs, cfg.seq_len) if val_convs else ([], {})
    report = {"source": cs.source, "format": cs.format, "read": len(cs.conversations) + sum(cs.skipped.values()),
              "skipped": cs.skipped, "train": train_report, "val": val_report}  # fmt: skip
    if main:
        atomic_write_json(run_dir / "data_report.json", report)
        print(summarize(cs), file=sys.stderr)
        print(f"lmforge sft: {train_report['examples']} train / {len(val)} val conversations, "
              f"{train_report['answer_tokens']:,} answer tokens of {train_report['tokens']:,}; "
              f"{train_report['truncated']} cut to seq_len={cfg.seq_len}, "
              f"{train_report['dropped_no_answer_left']} dropped (no answer left after the cut)", file=sys.stderr)  # fmt: skip
    return fmt, train, val, val_convs


def _sft(cfg: SftConfig, run_dir: Path, device: torch.device, dd) -> dict:
    from lmforge.chat.packing import PackedLoader, all_rows_batches

    base_model, base_ckpt, base_meta = ckpt.load_model(cfg.base)
    if cfg.seq_len == 0:
        cfg.seq_len = min(base_model.cfg.max_seq_len, 1024)
    existing = ckpt.list_checkpoints(run_dir)
    meta = ckpt.read_meta(existing[-1]) if existing else None
    if meta is not None:
        _check_resume(meta, cfg, existing[-1])
    base_fp = ckpt.file_fingerprint(ckpt.weights_path(base_ckpt, base_meta))
    if meta is not None and meta["base"]["fingerprint"] != base_fp:
        raise LmforgeError(f"{existing[-1]}: cannot resume: the base model {cfg.base} changed since this run started")
    if cfg.seq_len > base_model.cfg.max_seq_len:
        raise LmforgeError(
            f"config: seq_len ({cfg.seq_len}) exceeds the model's max_seq_len ({base_model.cfg.max_seq_len})"
        )
    tok_src = ckpt.tokenizer_dir(base_ckpt, base_meta)
    tok_dst = run_dir / "tokenizer"
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not tok_dst.exists():
            tmp = run_dir / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(tok_src, tmp)
            tmp.replace(tok_dst)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(cfg.seed)
    model = base_model
    if cfg.lora:
        apply_lora(model, cfg.lora_config)
    elif cfg.freeze_parts:
        _freeze(model, cfg.freeze_parts)
    start_step, tokens_seen = 0, 0
    if meta is not None:
        where = existing[-1] / ("adapter.safetensors" if cfg.lora else "model.safetensors")
        if cfg.lora:
            load_lora_tensors(model, ckpt.load_tensors(where), str(where))
        else:
            ckpt.load_model_weights(model, existing[-1])
        start_step, tokens_seen = meta["step"], meta["tokens_seen"]
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise LmforgeError("config: nothing left to train (every part is frozen)")
    fmt, train, val, val_convs = _prepare_data(cfg, tok_src, run_dir, dd.main)
    pad_id = fmt.tokenizer.token_to_id("<|pad|>")
    pad_id = pad_id if pad_id is not None else fmt.stop_ids[0] if fmt.stop_ids else 0

    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if meta is not None:
        try:
            optimizer.load_state_dict(ckpt.load_training_state(existing[-1]))
        except (ValueError, KeyError, RuntimeError) as e:
            raise LmforgeError(
                f"{existing[-1]}: optimizer state does not fit this run ({str(e).splitlines()[0]})"
            ) from None
    train_model = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    loader = PackedLoader(train, cfg.batch_size, cfg.seq_len, pad_id, cfg.seed, dd.rank, dd.world_size, device)
    if meta is not None:
        loader.load_state_dict(meta["loader"])
    val_batches = all_rows_batches(val, cfg.batch_size, cfg.seq_len, pad_id, device)[: cfg.eval_batches] if val else []
    logger = MetricsLogger(run_dir, resume_step=start_step if meta else None, enabled=dd.main)
    base_info = {"path": str(Path(base_ckpt).resolve()), "fingerprint": base_fp}
    tok_meta = {"dir": "../../tokenizer", "hash": tokenizer_hash(tok_src)}

    def save(step: int, tokens_seen: int) -> None:
        if not dd.main:
            return
        opt_tensors, opt_meta = ckpt.optimizer_tensors(optimizer.state_dict())
        ckpt_meta = {"model_config": model.cfg.to_dict(), "train_config": to_dict(cfg), "tokenizer": tok_meta,
                     "base": base_info, "loader": loader.state_dict(), "tokens_seen": tokens_seen, "stage": "sft"}  # fmt: skip
        if cfg.lora:
            ckpt_meta["adapter"] = cfg.lora_config.to_dict()
            tensors, name = lora_tensors(model), "adapter.safetensors"
        else:
            tensors, name = ckpt.model_tensors(model.state_dict(), model.cfg.tie_embeddings), "model.safetensors"
        ckpt.save_checkpoint(run_dir, step, tensors, ckpt_meta, opt_tensors, opt_meta, cfg.keep_last, weights_file=name)

    def run_eval(step: int) -> dict | None:
        if not val_batches:
            return None
        loss = evaluate_loss(model, val_batches, autocast())
        if dd.enabled:
            t = torch.tensor(loss, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            loss = float(t)
        rec = {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
        logger.log(rec)
        return rec

    if dd.main:
        mode = f"LoRA r={cfg.lora_rank}" if cfg.lora else "full" + (f" (frozen: {cfg.freeze})" if cfg.freeze else "")
        print(f"lmforge sft: {mode}, training {trainable:,} of {total:,} parameters ({trainable / total:.2%}) on "
              f"{device}; steps {start_step}->{cfg.max_steps}", file=sys.stderr)  # fmt: skip
    before = run_eval(0) if meta is None else None
    fpt = flops_per_token(model.cfg, cfg.seq_len)
    parts = LoopParts(train_model, optimizer, loader, save, run_eval, logger, device, dd, autocast, fpt,
                      peak_flops(device), run_dir)  # fmt: skip
    last = train_loop(cfg, parts, start_step, tokens_seen, desc="sft")
    result = {"trainable_params": trainable, "total_params": total, **last}
    if before:
        result["val_loss_before"] = before["val_loss"]
    if dd.main and start_step < cfg.max_steps:
        after = evaluate_loss(model, val_batches, autocast()) if val_batches else None
        result["val_loss_after"] = after
        result.update(write_samples(model, fmt, val_convs[: cfg.samples], run_dir / "samples.txt", device))
    return result


def _prompt_of(conv: list[dict]) -> list[dict]:
    """The conversation up to (not including) its first assistant turn."""
    first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
    return conv[:first]


def write_samples(model, fmt, convs: list[list[dict]], path: Path, device, max_new_tokens: int = 64) -> dict:
    """Greedy replies to held-out prompts -> `path`; returns how many ended at the turn-end token."""
    from lmforge.serve.generate import generate

    if not convs:
        return {}
    model.eval()
    prompts = [fmt.encode(_prompt_of(c), add_generation_prompt=True) for c in convs]
    budget = min(max_new_tokens, model.cfg.max_seq_len // 2)
    outs = generate(model, prompts, budget, temperature=0.0, stop_ids=fmt.stop_ids)
    ended = 0
    lines = []
    for conv, out in zip(convs, outs, strict=True):
        stopped = len(out) < budget  # generate() stops at a turn-end token and leaves it out
        ended += stopped
        reply = fmt.tokenizer.decode(out)
        lines.append(
            f"### user: {_prompt_of(conv)[-1]['content']}\n### reply{'' if stopped else ' (no turn end)'}: {reply}\n"
        )
    lines.append(f"ended at the turn-end token: {ended}/{len(convs)} (within {budget} new tokens)\n")
    atomic_write_text(path, "\n".join(lines))
    return {"samples_ended": ended, "samples": len(convs)}
