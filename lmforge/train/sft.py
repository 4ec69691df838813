"""Stage 2: supervised fine-tuning on conversations, loss on the answers only (full, LoRA or adapters).

    lmforge sft --model runs/demo --data chatterbot --out runs/demo-sft --max-steps 300
    lmforge sft --model models/smollm2 --data chitchat --out runs/smol-lora --lora --set lora_rank=16
    lmforge sft --model models/smollm2 --data chitchat --out runs/smol-adapter --adapter --set adapter_size=16
    lmforge sft --model runs/demo --data my_chats.jsonl --out runs/x --set freeze=embeddings
    lmforge sft --model runs/t5 --data pairs.jsonl --out runs/t5-sft     # an encoder-decoder: lmforge/train/seq2seq.py

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
fingerprint); `lmforge generate/chat/export` load it onto the base and merge it. An `--adapter`
run (Houlsby bottleneck adapters, lmforge/model/bottleneck.py) stores only its adapter the same
way; it does not merge: `generate/chat/eval` run it as the base with the adapters in it, and
`export`/`quantize` refuse it.
At the end, `samples.txt` holds greedy replies to held-out prompts and whether each
ended at the turn-end token.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.eval.loss import evaluate_loss
from lmforge.fileio import atomic_write_text
from lmforge.train.common import setup_distributed, teardown_distributed
from lmforge.train.finetune import FinetuneConfig, FinetuneRun, add_stage_command
from lmforge.train.loop import next_token_step, train_loop


@dataclass(frozen=True)
class SftConfig(FinetuneConfig):
    """Instruction tuning (stage 2): the shared fine-tuning fields plus these."""

    data: str = ""  # conversations: JSONL file/folder, or `chitchat` / `chatterbot`
    data_format: str = "auto"  # auto, alpaca, sharegpt, messages
    system: str = ""  # system prompt added to conversations that have none ("" = none)
    val_fraction: float = 0.05  # held-out conversations for the validation loss
    samples: int = 8  # held-out prompts answered greedily into samples.txt at the end
    # encoder-decoder (T5) only: the longest target in tokens (0 = seq_len); a longer one is an error
    target_len: int = 0

    def validate(self) -> SftConfig:
        if not self.data:
            raise LmforgeError("config: sft needs --data (a JSONL file/folder, or chitchat / chatterbot)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise LmforgeError("config: val_fraction must be in [0, 1)")
        return super().validate()


def register(subparsers) -> None:
    help = "instruction-tune a model on conversations (answer-only loss; --lora or --adapter)"
    add_stage_command(subparsers, "sft", help, SftConfig, sft, __doc__)


def sft(cfg: SftConfig) -> dict:
    """Run (or resume) supervised fine-tuning; returns {"val_loss_before", "val_loss_after", ...}."""
    run = FinetuneRun(cfg, "sft", resume_fields=("data", "data_format", "system", "val_fraction"), encoder_ok=True)
    if run.model.cfg.family == "encoder":
        raise LmforgeError(f"{cfg.base}: an encoder (BERT) does not write answers; fine-tune it with finetune-cls")
    dd = setup_distributed(run.device, run.cfg.dist_timeout_s)
    try:
        if run.model.cfg.family == "encoder-decoder":  # T5: input -> target pairs (lmforge/train/seq2seq.py)
            from lmforge.train.seq2seq import seq2seq

            return seq2seq(run.cfg, run, dd)
        return _sft(run.cfg, run, dd)
    finally:
        teardown_distributed()


def _prepare_data(cfg: SftConfig, tok_dir: Path, main: bool):
    """Read, split and encode the conversations (writes nothing); returns them and the data report."""
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
        print(summarize(cs), file=sys.stderr)
        print(f"lmforge sft: {train_report['examples']} train / {len(val)} val conversations, "
              f"{train_report['answer_tokens']:,} answer tokens of {train_report['tokens']:,}; "
              f"{train_report['truncated']} cut to seq_len={cfg.seq_len}, "
              f"{train_report['dropped_no_answer_left']} dropped (no answer left after the cut)", file=sys.stderr)  # fmt: skip
    return fmt, train, val, val_convs, report


def _sft(cfg: SftConfig, run: FinetuneRun, dd) -> dict:
    from lmforge.chat.packing import PackedLoader, all_rows_batches

    trainable, total = run.make_trainable()
    fmt, train, val, val_convs, report = _prepare_data(cfg, run.tokenizer_dir, dd.main)
    if dd.main:  # only now that the data is read: a bad --data leaves no run folder behind
        run.write_run_files({"data_report.json": report})
    pad_id = fmt.tokenizer.token_to_id("<|pad|>")
    pad_id = pad_id if pad_id is not None else fmt.stop_ids[0] if fmt.stop_ids else 0
    model, device = run.model, run.device
    optimizer = run.optimizer()
    train_model = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = PackedLoader(train, cfg.batch_size, cfg.seq_len, pad_id, cfg.seed, dd.rank, dd.world_size, device)
    if run.meta is not None:
        loader.load_state_dict(run.meta["loader"])
    val_batches = all_rows_batches(val, cfg.batch_size, cfg.seq_len, pad_id, device)[: cfg.eval_batches] if val else []

    def evaluate(step: int) -> dict | None:
        if not val_batches:
            return None
        loss = evaluate_loss(model, val_batches, run.autocast())
        if dd.enabled:
            t = torch.tensor(loss, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            loss = float(t)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    if dd.main:
        mode = "full" + (f" (frozen: {cfg.freeze})" if cfg.freeze else "")
        mode = f"LoRA r={cfg.lora_rank}" if cfg.lora else f"adapters m={cfg.adapter_size}" if cfg.adapter else mode
        run.say(f"{mode}, training {trainable:,} of {total:,} parameters ({trainable / total:.2%}) on {device}; "
                f"steps {run.start_step}->{cfg.max_steps}")  # fmt: skip
    hooks = run.hooks(optimizer, loader, evaluate, dd, refit=True)
    last = train_loop(cfg, train_model, optimizer, next_token_step(run.autocast), loader, hooks, **run.progress(),
                      desc="sft")  # fmt: skip
    before = last.pop("before", None)
    result = {"trainable_params": trainable, "total_params": total, **last}
    if before:
        result["val_loss_before"] = before["val_loss"]
    # Interrupted (Ctrl-C, SIGTERM): the checkpoint is saved; exit now rather than generate samples first.
    if dd.main and run.start_step < cfg.max_steps and last["stopped"] not in ("SIGINT", "SIGTERM"):
        result["val_loss_after"] = evaluate_loss(model, val_batches, run.autocast()) if val_batches else None
        result.update(write_samples(model, fmt, val_convs[: cfg.samples], run.run_dir / "samples.txt", device))
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
