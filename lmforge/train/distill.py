"""`lmforge distill`: knowledge distillation, a bigger model (the teacher) trains a smaller one (the student).

    lmforge distill --teacher models/smollm2 --student tiny --data shards/ --out runs/kd          # logit distillation
    lmforge distill --teacher models/smollm2 --student runs/x --data shards/ --out runs/kd --loss jsd --beta 0.5
    lmforge distill --teacher models/smollm2 --student tiny --from-generations prompts.jsonl --out runs/seqkd

Logit distillation (`--data`: token shards made with the teacher's tokenizer): for every micro-batch the
teacher (eval mode, no gradients, never saved) gives its next-token distribution at each position and the
student is trained on alpha * divergence(teacher, student) + (1 - alpha) * cross-entropy on the data's own
next tokens. The divergences (forward KL at temperature T scaled by T^2, as Hinton et al. 2015; reverse
KL; GKD's generalized JSD with beta, in TRL's convention) are in lmforge/train/distill_losses.py. Both
models must share one tokenizer (compared by hash, not by embedding rows: lmforge pads rows to a multiple
of 64, and the distributions are taken over the tokenizer's tokens only). The held-out split gives the
student's cross-entropy (`val_loss`, comparable with `lmforge pretrain`'s), its divergence from the
teacher (`val_kd`) and the teacher's own loss (`teacher_val_loss`).

Sequence-level distillation (`--from-generations`, Kim & Rush 2016; "distil your own model from a bigger
model's outputs"): the teacher answers each prompt (KV-cache batched sampling, `gen_temperature`, fixed
seed), the pairs are written to RUN/generations.jsonl as an SFT dataset (OpenAI `messages` records), and
the student is fine-tuned on them by `lmforge sft`'s own code (answer-only loss, packing, held-out split).
Prompts are JSONL `{"prompt": text or messages}` records (as grpo, ppo and best-of-n read them) or
conversations in any format `lmforge sft` reads (cut before their first assistant turn: the teacher's
answer replaces the dataset's). Only text passes between the models here, so their tokenizers may differ.

--student is a preset name (tiny, gpt2-124m, llama-1b, smollm2-135m: a fresh model, seeded, with the
teacher's vocabulary rows and tokenizer, saved once as RUN/student_init) or a model to start from (run,
checkpoint, imported folder; `./tiny` for a folder named like a preset). The run folder works like the
other stages': rerunning the same command resumes (RUN/distill.json records the mode, the student and the
teacher's weight fingerprint; checkpoints name the teacher by path and fingerprint, and a changed teacher
is refused), SIGTERM checkpoints and exits, metrics.jsonl holds `loss`, `ce` and `kd` per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.cli_config import add_config_command
from lmforge.config import require, to_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_json, atomic_write_text
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import pick_device, setup_distributed, stop_exit_code, teardown_distributed
from lmforge.train.distill_losses import DISTILL_LOSSES, hard_label_loss
from lmforge.train.finetune import FinetuneConfig, FinetuneRun
from lmforge.train.loop import train_loop

HELP = "distill a teacher into a student (logit KD, or SFT on its answers)"


@dataclass(frozen=True)
class DistillConfig(FinetuneConfig):
    """Knowledge distillation: the shared fine-tuning fields plus these. Each field's comment is its help text."""

    # the student: a preset (tiny, gpt2-124m, llama-1b, smollm2-135m: fresh, with the teacher's vocabulary) or a
    # model to start from (run, checkpoint or imported folder)
    base: str = ""
    teacher: str = ""  # the teacher: run, checkpoint or imported model folder (eval mode, never trained or saved)
    data: str = ""  # logit distillation: token shards made with the teacher's tokenizer (`lmforge data tokenize`)
    from_generations: str = ""  # sequence-level instead: JSONL prompts or conversations the teacher answers
    loss: str = "forward_kl"  # forward_kl, reverse_kl or jsd (lmforge/train/distill_losses.py)
    temperature: float = 1.0  # softmax temperature of both distributions; the divergence is scaled by T^2
    beta: float = 0.5  # jsd: the teacher's weight in the mixture (0 = forward KL, 1 = reverse KL; TRL's convention)
    alpha: float = 0.5  # loss = alpha * divergence + (1 - alpha) * cross-entropy on the data (0: no teacher at all)
    gen_temperature: float = 0.0  # --from-generations: the teacher's sampling temperature (0 = greedy)
    gen_top_p: float = 1.0  # --from-generations: nucleus sampling (1 = off)
    max_new_tokens: int = 128  # --from-generations: longest teacher answer
    gen_batch_size: int = 16  # --from-generations: prompts answered together
    keep_unfinished: bool = False  # --from-generations: keep answers cut at max_new_tokens (teaches stopping anywhere)
    system: str = ""  # --from-generations: system prompt for prompts that have none ("" = none)
    val_fraction: float = 0.05  # --from-generations: held-out conversations (SFT's split)
    samples: int = 8  # --from-generations: held-out prompts the student answers greedily into samples.txt
    # A fresh preset student trains like pretraining (lower it, ~1e-4, for a student that is already trained).
    lr: float = 1e-3
    warmup_steps: int = 20  # linear warmup steps

    def validate(self) -> DistillConfig:
        checks = [
            (bool(self.teacher), "distill needs --teacher (a run, checkpoint or imported model folder)"),
            (bool(self.base), "distill needs --student (a preset name, or a model to start from)"),
            (bool(self.data) != bool(self.from_generations),
             "distill needs one of --data (token shards: logit distillation) or --from-generations (prompts)"),
            (self.loss in DISTILL_LOSSES, f"loss must be one of {', '.join(DISTILL_LOSSES)}, got {self.loss!r}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 <= self.beta <= 1, f"beta must be in [0, 1], got {self.beta}"),
            (0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.gen_temperature >= 0, f"gen_temperature must be >= 0, got {self.gen_temperature}"),
            (0 < self.gen_top_p <= 1, f"gen_top_p must be in (0, 1], got {self.gen_top_p}"),
            (self.max_new_tokens >= 1 and self.gen_batch_size >= 1, "max_new_tokens and gen_batch_size must be >= 1"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
        ]  # fmt: skip
        require(checks)
        return super().validate()


def register(subparsers) -> None:
    add_config_command(subparsers, "distill", HELP, DistillConfig, distill, rename={"base": "student"},
                       description=__doc__, exit_code=stop_exit_code)  # fmt: skip


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer_dir: Path
    record: dict  # {"path", "fingerprint", "tokenizer_hash"}: what checkpoints and distill.json say of it


def load_teacher(path: str) -> Teacher:
    model, where, meta = ckpt.load_model(path)
    tok_dir = ckpt.tokenizer_dir(where, meta)
    record = {"path": str(where.resolve()), "fingerprint": ckpt.file_fingerprint(ckpt.weights_path(where, meta)),
              "tokenizer_hash": tokenizer_hash(tok_dir)}  # fmt: skip
    return Teacher(model.eval().requires_grad_(False), tok_dir, record)


def distill(cfg: DistillConfig) -> dict:
    """Run (or resume) a distillation as configured; returns the last metrics record (and the SFT result's fields)."""
    teacher = load_teacher(cfg.teacher)
    # Under torchrun: rank 0 writes, the others wait for it.
    dd = setup_distributed(pick_device(cfg.device), cfg.dist_timeout_s)
    try:
        return (_sequence_level if cfg.from_generations else _logit_level)(cfg, teacher, dd)
    finally:
        teardown_distributed()


# ----------------------------------------------------------------------------- the student and the run folder


def _student(cfg: DistillConfig, teacher: Teacher) -> tuple[dict | None, Path, dict]:
    """(the preset's model config or None, the student's tokenizer folder, its model config as a dict)."""
    from lmforge.model.presets import PRESETS, preset

    if cfg.base in PRESETS:  # a fresh model with the teacher's vocabulary rows: it shares the teacher's tokenizer
        model_cfg = dataclasses.replace(preset(cfg.base), vocab_size=teacher.model.cfg.vocab_size).to_dict()
        return model_cfg, teacher.tokenizer_dir, model_cfg
    if not Path(cfg.base).exists():
        raise LmforgeError(f"--student {cfg.base}: neither a preset ({', '.join(PRESETS)}) nor a model folder")
    where = ckpt.resolve_checkpoint(cfg.base)
    meta = ckpt.read_meta(where)
    return None, ckpt.tokenizer_dir(where, meta), meta["model_config"]


def _check_lengths(cfg: DistillConfig, student_cfg: dict, teacher: Teacher) -> None:
    seq_len = cfg.seq_len or min(student_cfg["max_seq_len"], 1024)  # what FinetuneRun will resolve
    if seq_len > student_cfg["max_seq_len"] or (cfg.data and seq_len > teacher.model.cfg.max_seq_len):
        limits = f"student {student_cfg['max_seq_len']}, teacher {teacher.model.cfg.max_seq_len}"
        raise LmforgeError(f"config: seq_len ({seq_len}) exceeds the models' max_seq_len ({limits})")


def _claim_run_folder(cfg: DistillConfig, key: dict, write: bool) -> None:
    """Refuse an --out that holds another run, or this run's outputs made with another teacher, student or data;
    else (`write`) record `key` in RUN/distill.json: the first write to the folder, once every input is checked
    (a folder where nothing was made yet, after a failed start, is claimed anew)."""
    out = Path(cfg.out)
    marker = out / "distill.json"
    made = ckpt.list_checkpoints(out) or (out / "generations.jsonl").exists()
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))["key"]
        changed = next((name for name in key if saved.get(name) != key[name]), None)
        if changed is None:
            return
        if made:
            raise LmforgeError(f"{out}: cannot resume: {changed} is {saved.get(changed)!r} in this run but "
                               f"{key[changed]!r} now (use a new --out, or the same command)")  # fmt: skip
    elif made or (out / "config.yaml").exists() or (out / "meta.json").exists():
        found = ckpt.list_checkpoints(out)
        what = f" (a {ckpt.read_meta(found[-1]).get('stage', 'pretrain')} run)" if found else ""
        raise LmforgeError(f"{out} holds another run{what}, not a distillation; use a new --out")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"key": key, "config": to_dict(cfg)})


def _start_run(cfg: DistillConfig, key: dict, preset_cfg: dict | None, teacher: Teacher, dd) -> str:
    """Claim the run folder; return the student checkpoint to start from: --student itself, or for a preset
    RUN/student_init (seeded, with a copy of the teacher's tokenizer so it stands alone; made again only if it
    was made for another preset or seed, which the claim allows only before any training)."""
    from lmforge.model.transformer import ModelConfig, Transformer

    _claim_run_folder(cfg, {**key, "seed": cfg.seed}, write=dd.main)
    init = Path(cfg.out) / "student_init"
    want = {"preset": cfg.base, "seed": cfg.seed, "model_config": preset_cfg}
    found = ckpt.list_checkpoints(init)
    if preset_cfg is not None and dd.main and (not found or ckpt.read_meta(found[-1]).get("init") != want):
        shutil.rmtree(init, ignore_errors=True)
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_dict(preset_cfg))
        shutil.copytree(teacher.tokenizer_dir, init / "tokenizer")
        tok = {"dir": "../../tokenizer", "hash": teacher.record["tokenizer_hash"]}
        meta = {"model_config": preset_cfg, "tokenizer": tok, "stage": "student_init", "init": want}
        ckpt.save_checkpoint(init, 0, ckpt.model_tensors(model.state_dict(), model.cfg.tie_embeddings), meta)
    if dd.enabled:
        dist.barrier()  # the other ranks read what rank 0 wrote
    return cfg.base if preset_cfg is None else str(init)


# ----------------------------------------------------------------------------- logit distillation


def distill_step(teacher, loss_fn, cfg: DistillConfig, n_vocab: int, autocast):
    """The loop's step: alpha * divergence(teacher, student) + (1 - alpha) * cross-entropy, on a batch (x, y).

    Logits are cut to the tokenizer's `n_vocab` tokens (padded embedding rows are no token). The teacher runs
    per micro-batch under no_grad; with alpha = 0 it does not run at all: the step is pretraining's.
    """

    def step(model, batch) -> tuple[torch.Tensor, int, dict]:
        x, y = batch
        mask = y != -100
        with autocast():
            if cfg.alpha == 0:  # pretraining's own step (the fused head + loss, no logits held)
                _, ce = model(x, y)
                return ce, int(mask.sum()), {"ce": ce.detach()}
            logits = model(x)[0][..., :n_vocab]
            ce = hard_label_loss(logits, y)
            with torch.no_grad():
                target = teacher(x)[0][..., :n_vocab]
            kd = loss_fn(logits, target, mask, temperature=cfg.temperature, beta=cfg.beta)
        loss = kd if cfg.alpha == 1 else cfg.alpha * kd + (1 - cfg.alpha) * ce
        return loss, int(mask.sum()), {"ce": ce.detach(), "kd": kd.detach()}

    return step


@torch.no_grad()
def held_out_teacher(model, teacher, batches, loss_fn, cfg: DistillConfig, n_vocab: int, autocast) -> dict:
    """Over held-out batches, one teacher pass each: the student's divergence from the teacher (`val_kd`) and
    the teacher's own next-token loss (`teacher_val_loss`, over all its rows, as `evaluate_loss` takes it)."""
    was = model.training
    model.eval()
    kd, ce, count = 0.0, 0.0, 0
    for x, y in batches:
        mask = y != -100
        with autocast():
            s, t = model(x)[0], teacher(x)[0]
            n = int(mask.sum())
            kd += float(loss_fn(s[..., :n_vocab], t[..., :n_vocab], mask, temperature=cfg.temperature,
                                beta=cfg.beta)) * n  # fmt: skip
            ce += float(torch.nn.functional.cross_entropy(t.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += n
    model.train(was)
    return {"val_kd": kd / max(count, 1), "teacher_val_loss": ce / max(count, 1)}


def _logit_level(cfg: DistillConfig, teacher: Teacher, dd) -> dict:
    from lmforge.data.loader import TokenLoader
    from lmforge.data.shards import load_index
    from lmforge.eval.loss import bits_per_byte, evaluate_loss

    index = load_index(cfg.data)
    preset_cfg, student_tok, student_cfg = _student(cfg, teacher)
    theirs, ours = teacher.record["tokenizer_hash"], tokenizer_hash(student_tok)
    if ours != theirs:
        raise LmforgeError(f"the student's tokenizer ({ours}, {student_tok}) is not the teacher's ({theirs}, "
                           f"{teacher.tokenizer_dir}): logit distillation compares the two distributions token by "
                           "token; use a preset student (it takes the teacher's) or --from-generations")  # fmt: skip
    if index["tokenizer_hash"] != theirs:
        raise LmforgeError(f"{cfg.data}: shards were made with tokenizer {index['tokenizer_hash']}, not the "
                           f"teacher's ({theirs}); tokenize with `lmforge data tokenize --tokenizer "
                           f"{teacher.tokenizer_dir}`")  # fmt: skip
    n_vocab = index["vocab_size"]  # the tokenizer's size; rows above it are padding
    if min(student_cfg["vocab_size"], teacher.model.cfg.vocab_size) < n_vocab:
        raise LmforgeError(f"the student ({student_cfg['vocab_size']} embedding rows) or the teacher "
                           f"({teacher.model.cfg.vocab_size}) has fewer rows than the {n_vocab} tokens")  # fmt: skip
    _check_lengths(cfg, student_cfg, teacher)
    key = {"mode": "logits", "student": cfg.base, "teacher": teacher.record["fingerprint"]}
    run = FinetuneRun(dataclasses.replace(cfg, base=_start_run(cfg, key, preset_cfg, teacher, dd)), "distill",
                      resume_fields=("data", "loss", "temperature", "beta", "alpha"))  # fmt: skip
    if run.meta is not None and run.meta.get("teacher", {}).get("fingerprint") != teacher.record["fingerprint"]:
        raise LmforgeError(f"{run.resume_from}: cannot resume: the teacher {cfg.teacher} changed since")

    cfg = run.cfg
    trainable, total = run.make_trainable()
    if dd.main:
        run.write_run_files()
    model, device = run.model, run.device
    teacher_model = teacher.model.to(device)
    optimizer = run.optimizer()
    train_model = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, dd.rank, dd.world_size,
                         index["tokenizer_hash"], device)  # fmt: skip
    if run.meta is not None:
        loader.load_state_dict(run.meta["loader"])
    val = index["splits"].get("val", [])
    val_tokens, val_bytes = sum(s["num_tokens"] for s in val), sum(s["num_bytes"] for s in val)
    val_rows = min(cfg.batch_size, (val_tokens - 1) // (cfg.seq_len * dd.world_size)) if val_tokens else 0
    val_batches = []
    if val_rows >= 1 and cfg.eval_batches > 0:  # as pretraining reads it, so the val_loss figures compare
        vl = TokenLoader(cfg.data, "val", val_rows, cfg.seq_len, dd.rank, dd.world_size, device=device)
        n = max(1, min(cfg.eval_batches, val_tokens // (val_rows * cfg.seq_len * dd.world_size)))
        val_batches = [vl.next_batch() for _ in range(n)]
    elif dd.main:
        run.say(f"no held-out figures: {cfg.data} has no val split of one sequence (seq_len {cfg.seq_len})")
    loss_fn = DISTILL_LOSSES[cfg.loss]

    def evaluate(step: int) -> dict | None:
        if not val_batches:
            return None
        rec = {"val_loss": evaluate_loss(model, val_batches, run.autocast())}
        if cfg.alpha > 0:  # alpha = 0 runs no teacher, here neither
            rec.update(held_out_teacher(model, teacher_model, val_batches, loss_fn, cfg, n_vocab, run.autocast))
        if dd.enabled:
            t = torch.tensor(list(rec.values()), device=device)
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            rec = dict(zip(rec, t.tolist(), strict=True))
        rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
        rec["val_bpb"] = bits_per_byte(rec["val_loss"], val_tokens, val_bytes)
        return rec

    if dd.main:
        size = sum(p.numel() for p in teacher_model.parameters())
        run.say(f"{cfg.loss} at T={cfg.temperature}, alpha={cfg.alpha}; teacher {size:,} parameters, "
                f"student training {trainable:,} of {total:,} on {device}; "
                f"steps {run.start_step}->{cfg.max_steps}")  # fmt: skip
    save = run.saver(optimizer, loader, dd.main, extra_meta={"teacher": teacher.record})
    hooks = run.hooks(optimizer, loader, evaluate, dd, save=save, refit=True)
    step_fn = distill_step(teacher_model, loss_fn, cfg, n_vocab, run.autocast)
    last = train_loop(cfg, train_model, optimizer, step_fn, loader, hooks, **run.progress(), desc="distill")
    return {"trainable_params": trainable, "total_params": total, **last}


# ----------------------------------------------------------------------------- sequence-level distillation


def read_prompts(path: str, system: str = "") -> tuple[list[list[dict]], dict]:
    """Prompt message lists from `{"prompt": ...}` JSONL, or from conversations cut before their first answer."""
    from lmforge.align.rollout import load_prompts
    from lmforge.chat.datasets import load_conversations

    try:
        return load_prompts(path, system or None)
    except LmforgeError as as_prompts:
        try:
            cs = load_conversations(path, system=system or None)
        except LmforgeError as as_conversations:
            raise LmforgeError(f"--from-generations: neither prompts ({as_prompts}) nor conversations "
                               f"({as_conversations})") from None  # fmt: skip
    firsts = [next(i for i, m in enumerate(c) if m["role"] == "assistant") for c in cs.conversations]
    return [c[:i] for c, i in zip(cs.conversations, firsts, strict=True)], cs.skipped


def teacher_answers(cfg: DistillConfig, teacher: Teacher, prompts: list[list[dict]], device) -> tuple[str, dict]:
    """The teacher's answer to each prompt as `messages` JSONL text, and a report of what was kept."""
    from tqdm import tqdm

    from lmforge.chat.template import ChatFormat
    from lmforge.serve.generate import generate

    fmt = ChatFormat(teacher.tokenizer_dir)
    if not fmt.stop_ids:
        raise LmforgeError(f"{teacher.tokenizer_dir}: the teacher's tokenizer has no turn-end token to stop answers at")
    model = teacher.model.to(device)
    lines, dropped, tokens, began = [], {"unfinished": 0, "empty": 0}, 0, time.perf_counter()
    for i in tqdm(range(0, len(prompts), cfg.gen_batch_size), desc="distill: teacher answers", mininterval=1.0):
        chunk = prompts[i : i + cfg.gen_batch_size]
        ids = [fmt.encode(p, add_generation_prompt=True) for p in chunk]
        outs = generate(model, ids, cfg.max_new_tokens, temperature=cfg.gen_temperature, top_p=cfg.gen_top_p,
                        seed=cfg.seed + i, stop_ids=fmt.stop_ids, pad_id=fmt.stop_ids[0])  # fmt: skip
        for messages, out in zip(chunk, outs, strict=True):
            tokens += len(out)
            text = fmt.tokenizer.decode(out)
            if len(out) >= cfg.max_new_tokens and not cfg.keep_unfinished:  # generate() leaves the stop token out
                dropped["unfinished"] += 1
            elif not text.strip():
                dropped["empty"] += 1
            else:
                record = {"messages": [*messages, {"role": "assistant", "content": text}]}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    report = {"prompts": len(prompts), "written": len(lines), "dropped": dropped, "tokens": tokens,
              "seconds": round(time.perf_counter() - began, 2)}  # fmt: skip
    if not lines:
        raise LmforgeError(f"the teacher finished none of the {len(prompts)} answers within max_new_tokens="
                           f"{cfg.max_new_tokens} ({dropped}); raise it, or set keep_unfinished=true")  # fmt: skip
    return "".join(lines), report


def _digest(path: Path) -> str:
    """A content hash of the prompts (a file, or a folder's files; `hf:NAME`: the name), for resumes to compare."""
    if not path.exists():
        return str(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _sequence_level(cfg: DistillConfig, teacher: Teacher, dd) -> dict:
    from lmforge.train.sft import SftConfig, sft

    prompts, skipped = read_prompts(cfg.from_generations, cfg.system)
    preset_cfg, _, student_cfg = _student(cfg, teacher)
    _check_lengths(cfg, student_cfg, teacher)
    if cfg.max_new_tokens >= teacher.model.cfg.max_seq_len:
        raise LmforgeError(f"config: max_new_tokens ({cfg.max_new_tokens}) must be below the teacher's max_seq_len "
                           f"({teacher.model.cfg.max_seq_len})")  # fmt: skip
    digest = _digest(Path(cfg.from_generations))
    names = ("gen_temperature", "gen_top_p", "max_new_tokens", "gen_batch_size", "keep_unfinished", "system", "seed")
    generation = {name: getattr(cfg, name) for name in names}
    key = {"mode": "generations", "student": cfg.base, "teacher": teacher.record["fingerprint"], "prompts": digest,
           "generation": generation}  # fmt: skip
    base = _start_run(cfg, key, preset_cfg, teacher, dd)
    data = Path(cfg.out) / "generations.jsonl"
    if dd.main and not data.is_file():  # written whole or not at all: its presence means the teacher is done
        text, report = teacher_answers(cfg, teacher, prompts, pick_device(cfg.device))
        report.update(source=cfg.from_generations, skipped=skipped, teacher=teacher.record)
        atomic_write_json(Path(cfg.out) / "generations_report.json", report)
        atomic_write_text(data, text)
        print(f"lmforge distill: the teacher answered {report['prompts']} prompts in {report['seconds']} s; "
              f"{report['written']} written to {data} (dropped: {report['dropped']})", file=sys.stderr)  # fmt: skip
    if dd.enabled:
        dist.barrier()  # the other ranks wait for rank 0's generations
    teacher.model.cpu()  # SFT does not need it: free the device's memory
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FinetuneConfig)}
    shared["base"] = base
    sft_cfg = SftConfig(**shared, data=str(data), val_fraction=cfg.val_fraction, samples=cfg.samples).validate()
    result = sft(sft_cfg)
    return {**result, "generations": str(data)}
