"""`lmforge finetune-cls`: sequence classification, BERT's fine-tuning ("专才": pretrain, then one task).

    lmforge finetune-cls --model runs/bert --data topics.jsonl --label-field topic --out runs/bert-cls
    lmforge finetune-cls --model runs/bert --data pairs.csv --text-field premise --text-pair-field hypothesis \\
        --label-field label --out runs/nli
    lmforge finetune-cls --model runs/bert --from-scratch ...      # the same architecture from random weights

An encoder (model.family=encoder) classifies with its pooled [CLS] vector (the pooler and classifier of
lmforge/model/encoder.py, `n_classes` set to the labels); a decoder with a linear head on the hidden state of its
last token (saved as head.safetensors, as the reward model's), so both families run the same task. Data: JSONL,
JSON, Parquet or CSV records with a text field (and optionally a second segment) and a label field; labels are
read as strings, in sorted order. The held-out split is stratified by label (val_fraction of each label, seeded),
or a separate --val-data file whose labels must all occur in training. Evaluation reports accuracy with its 95%
Wilson interval, macro-F1 and precision/recall/F1 per class (`classification_report`). Texts longer than seq_len
are cut and counted in data_report.json; a record without its text or label is a one-line error naming the file
and line.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.config import require
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson_interval
from lmforge.train.common import setup_distributed, teardown_distributed
from lmforge.train.finetune import FinetuneConfig, FinetuneRun, add_stage_command
from lmforge.train.loop import train_loop


@dataclass(frozen=True)
class ClassifyConfig(FinetuneConfig):
    """Sequence classification: the shared fine-tuning fields plus these."""

    data: list[str] = field(default_factory=list, metadata={"metavar": "FILE"})  # JSONL/JSON/Parquet/CSV records
    text_field: str = "text"  # the field holding the text to classify
    text_pair_field: str = ""  # a second text per record (sentence pairs: [CLS] A [SEP] B [SEP]); empty = none
    label_field: str = "label"  # the field holding the class (read as a string)
    val_data: list[str] = field(default_factory=list, metadata={"metavar": "FILE"})  # held-out records, else a split
    val_fraction: float = 0.1  # without val_data: share of each label's records held out (stratified, seeded)
    from_scratch: bool = False  # the model's architecture from random weights (the baseline pretraining is judged by)
    batch_size: int = 32  # records per micro-batch per process
    # tokens per record at most (0 = the model's max_seq_len, up to 1024); longer ones are cut and counted in
    # data_report.json. Batches pad to their longest record, so a high limit costs nothing on short texts
    seq_len: int = 0
    lr: float = 1e-4  # peak LR (BERT fine-tuning: 2e-5..5e-5 for bert-base; small models take more)
    eval_batches: int = 1000  # held-out batches per evaluation (at most): all of a usual split

    def validate(self) -> ClassifyConfig:
        require([(bool(self.data), "finetune-cls needs --data (records with a text and a label field)"),
                 (0 < self.val_fraction < 1 or bool(self.val_data), "val_fraction must be in (0, 1)")])  # fmt: skip
        return super().validate()


def register(subparsers) -> None:
    help = "fine-tune a classifier (encoder [CLS] or decoder last token) on labelled text: accuracy, F1 per class"
    add_stage_command(subparsers, "finetune-cls", help, ClassifyConfig, finetune_cls, __doc__)


# ----------------------------------------------------------------------------- data


def read_labelled(paths: list[str], text_field: str, pair_field: str, label_field: str) -> list[tuple]:
    """[(text, pair text or None, label)] of every record; a missing or non-text field is an error naming where."""
    from lmforge.data.readers import Unreadable, list_files, read_records

    out = []
    csvs = [Path(p) for p in paths if str(p).lower().endswith(".csv")]
    others = [p for p in paths if Path(p) not in csvs]
    for src in [*csvs, *(list_files(others) if others else [])]:
        bad: list[Unreadable] = []
        if src in csvs:
            records = _csv_records(src)
        else:
            records = ((rec, where) for rec, where, _ in read_records(src, bad))
        for rec, where in records:
            if not isinstance(rec, dict):
                raise LmforgeError(f"{where}: expected a record (an object with fields), got {type(rec).__name__}")
            values = []
            for name in (text_field, pair_field, label_field):
                if not name:
                    values.append(None)
                    continue
                value = rec.get(name)
                if value is None or value == "" or isinstance(value, (dict, list)):
                    have = ", ".join(sorted(map(str, rec))) or "none"
                    raise LmforgeError(f"{where}: no {name!r} field (or it is empty); the record has: {have}")
                values.append(str(value))
            out.append(tuple(values))
        if bad:  # strict: a labelled set with a record lost is not the set the user gave
            raise LmforgeError(bad[0].message())
    if not out:
        raise LmforgeError(f"{', '.join(paths)}: no records")
    return out


def _csv_records(path: Path):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for lineno, row in enumerate(csv.DictReader(f), start=2):
                yield row, f"{path}:{lineno}"
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise LmforgeError(f"{path}: cannot read CSV ({e})") from None


def stratified_split(records: list[tuple], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): round(fraction x n) of each label's records held out (a label with one record stays in
    training), drawn with `seed`."""
    by_label: dict[str, list] = {}
    for rec in records:
        by_label.setdefault(rec[2], []).append(rec)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n = min(len(group) - 1, round(fraction * len(group)))
        val += group[:n]
        train += group[n:]
    return train, val


def encode_records(records, tok, labels: list[str], seq_len: int, encoder: bool, where: str) -> tuple[list, int]:
    """[(ids, token types, label index)] and how many were cut to seq_len. An encoder's rows are the tokenizer's
    `[CLS] A [SEP] (B [SEP])`; a decoder's are A (newline B) and its end-of-text token, read at the last token."""
    from lmforge.tokenizer.special import document_end_id

    index = {label: i for i, label in enumerate(labels)}
    eot = document_end_id(tok)
    out, cut = [], 0
    for text, pair, label in records:
        if label not in index:
            raise LmforgeError(f"{where}: label {label!r} does not occur in the training data "
                               f"(its labels: {', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")  # fmt: skip
        if encoder:
            enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
            ids, types = enc.ids, enc.type_ids
            if len(ids) > seq_len:  # keep [CLS] ... and end on [SEP]
                ids, types = ids[: seq_len - 1] + ids[-1:], types[: seq_len - 1] + types[-1:]
                cut += 1
        else:
            ids = tok.encode(text if pair is None else f"{text}\n{pair}", add_special_tokens=False).ids + [eot]
            if len(ids) > seq_len:
                ids, cut = ids[: seq_len - 1] + [eot], cut + 1
            types = [0] * len(ids)
        out.append((ids, types, index[label]))
    return out, cut


def collate(rows, pad_id: int, device) -> dict:
    T = max(len(r[0]) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    types = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (ids, tt, _) in enumerate(rows):
        idx[i, : len(ids)], types[i, : len(tt)] = torch.tensor(ids), torch.tensor(tt)
    lengths = torch.tensor([len(r[0]) for r in rows])
    batch = {"idx": idx, "token_types": types, "key_mask": torch.arange(T)[None] < lengths[:, None],
             "labels": torch.tensor([r[2] for r in rows]), "last": lengths - 1}  # fmt: skip
    return {**{k: v.to(device) for k, v in batch.items()}, "num_tokens": int(lengths.sum())}


class RecordLoader:
    """Resumable shuffled batches of encoded records, `collate(rows)` each (reshuffled each epoch by seed; rank r of
    W takes its share). Also seq2seq's (lmforge/train/seq2seq.py)."""

    def __init__(self, rows, batch_size, collate, seed=0, rank=0, world_size=1):
        if len(rows) < batch_size * world_size:
            batch_size = max(1, len(rows) // world_size)  # a small task: a smaller batch rather than none
        self.rows, self.B, self.collate, self.seed = rows, batch_size, collate, seed
        self.rank, self.world = rank, world_size
        self.epoch, self.cursor = 0, 0

    def next_batch(self) -> dict:
        per_step = self.B * self.world
        if self.cursor + per_step > len(self.rows):
            self.epoch, self.cursor = self.epoch + 1, 0
        order = list(range(len(self.rows)))
        random.Random(self.seed + self.epoch).shuffle(order)
        start = self.cursor + self.rank * self.B
        self.cursor += per_step
        return self.collate([self.rows[i] for i in order[start : start + self.B]])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ----------------------------------------------------------------------------- model and metrics


def class_logits(model, head: nn.Module | None, batch: dict) -> torch.Tensor:
    """(B, classes): the encoder's classifier on [CLS], or the decoder's head on each row's last token."""
    if head is None:
        logits, _ = model(batch["idx"], token_types=batch["token_types"], key_mask=batch["key_mask"], head="cls")
        return logits
    hidden, _ = model(batch["idx"], return_hidden=True)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["last"]])


def classification_report(pred: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy (with its 95% Wilson interval), macro-F1, and precision/recall/F1/support per class."""
    n = len(gold)
    right = sum(p == g for p, g in zip(pred, gold, strict=True))
    per_class = {}
    for i, label in enumerate(labels):
        tp = sum(p == i and g == i for p, g in zip(pred, gold, strict=True))
        fp = sum(p == i and g != i for p, g in zip(pred, gold, strict=True))
        fn = sum(p != i and g == i for p, g in zip(pred, gold, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        per_class[label] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                            "support": tp + fn}  # fmt: skip
    present = [v["f1"] for v in per_class.values() if v["support"]]
    lo, hi = wilson_interval(right, n)
    return {"val_accuracy": right / max(n, 1), "val_accuracy_lo": lo, "val_accuracy_hi": hi,
            "val_macro_f1": sum(present) / max(len(present), 1), "val_records": n, "per_class": per_class}  # fmt: skip


@torch.no_grad()
def evaluate_classifier(model, head, batches, labels: list[str]) -> dict:
    was = model.training
    model.eval()
    pred, gold = [], []
    for batch in batches:
        pred += class_logits(model, head, batch).argmax(-1).tolist()
        gold += batch["labels"].tolist()
    model.train(was)
    return classification_report(pred, gold, labels)


def _with_classifier(model, n_classes: int, from_scratch: bool, seed: int):
    """The encoder with a classifier of n_classes (the pooler kept when the base has one: NSP/SOP pretraining),
    or a fresh one of the same shape (from_scratch)."""
    from lmforge.model.encoder import Encoder

    cfg = dataclasses.replace(model.cfg, n_classes=n_classes)
    torch.manual_seed(seed)
    new = Encoder(cfg)
    if not from_scratch:
        keep = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
        new.load_state_dict(keep, strict=False)
    return new


def finetune_cls(cfg: ClassifyConfig) -> dict:
    run = FinetuneRun(cfg, "finetune-cls", resume_fields=("data", "label_field", "val_fraction", "from_scratch"),
                      encoder_ok=True)  # fmt: skip
    dd = setup_distributed(run.device, run.cfg.dist_timeout_s)
    try:
        return _train(run.cfg, run, dd)
    finally:
        teardown_distributed()


def _train(cfg: ClassifyConfig, run: FinetuneRun, dd) -> dict:
    from lmforge.tokenizer.special import load_tokenizer

    records = read_labelled(cfg.data, cfg.text_field, cfg.text_pair_field, cfg.label_field)
    if cfg.val_data:
        train, val = records, read_labelled(cfg.val_data, cfg.text_field, cfg.text_pair_field, cfg.label_field)
    else:
        train, val = stratified_split(records, cfg.val_fraction, cfg.seed)
    labels = sorted({r[2] for r in train})
    if len(labels) < 2:
        raise LmforgeError(f"{', '.join(cfg.data)}: field {cfg.label_field!r} has {len(labels)} distinct value(s); "
                           "a classifier needs at least 2")  # fmt: skip
    if run.model.cfg.family == "encoder-decoder":
        raise LmforgeError(f"{cfg.base}: an encoder-decoder (T5); finetune-cls takes an encoder or a decoder")
    encoder = run.model.cfg.family == "encoder"
    head = None
    if encoder:
        run.model = _with_classifier(run.model, len(labels), cfg.from_scratch, cfg.seed)
    else:
        if cfg.from_scratch:
            from lmforge.model.transformer import Transformer

            torch.manual_seed(cfg.seed)
            run.model = Transformer(run.model.cfg)
        head = nn.Linear(run.model.cfg.d_model, len(labels))
        with torch.no_grad():
            head.weight.normal_(0.0, run.model.cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
            head.bias.zero_()
    tok = load_tokenizer(run.tokenizer_dir)
    train_rows, train_cut = encode_records(train, tok, labels, cfg.seq_len, encoder, ", ".join(cfg.data))
    val_rows, val_cut = encode_records(val, tok, labels, cfg.seq_len, encoder, ", ".join(cfg.val_data or cfg.data))
    trainable, total = run.make_trainable(head)
    report = {"labels": labels, "train_records": len(train_rows), "val_records": len(val_rows),
              "train_truncated": train_cut, "val_truncated": val_cut, "seq_len": cfg.seq_len,
              "train_per_label": {label: sum(r[2] == i for r in train_rows) for i, label in enumerate(labels)}}  # fmt: skip
    if dd.main:
        run.write_run_files({"data_report.json": report})
        cut = f", {train_cut + val_cut} cut to {cfg.seq_len} tokens" if train_cut + val_cut else ""
        run.say(f"{len(train_rows)} train / {len(val_rows)} held-out records, {len(labels)} labels{cut}; "
                f"training {trainable:,} of {total:,} parameters ({'encoder [CLS]' if encoder else 'decoder last token'})")  # fmt: skip
    pad_id = 0 if encoder else (tok.token_to_id("<|pad|>") or 0)
    loader = RecordLoader(train_rows, cfg.batch_size, lambda rows: collate(rows, pad_id, run.device), cfg.seed, dd.rank,
                          dd.world_size)  # fmt: skip
    if run.meta is not None:
        loader.load_state_dict(run.meta["loader"])
    val_batches = [collate(val_rows[i : i + cfg.batch_size], pad_id, run.device)
                   for i in range(0, len(val_rows), cfg.batch_size)][: cfg.eval_batches]  # fmt: skip
    optimizer = run.optimizer()
    model = run.model

    def step(model_, batch):
        with run.autocast():
            logits = class_logits(model_, head, batch).float()
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        return loss, batch["num_tokens"], {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}

    def evaluate(step: int) -> dict | None:
        if not val_batches:
            return None
        record = evaluate_classifier(model, head, val_batches, labels)
        record.pop("per_class")  # the metrics stream holds numbers; the table goes to eval_report.json at the end
        return record

    # The labels travel with each checkpoint (export writes them as id2label).
    save = run.saver(optimizer, loader, dd.main, extra_meta={"labels": labels, "label_field": cfg.label_field})
    hooks = run.hooks(optimizer, loader, evaluate, dd, save=save)
    result = train_loop(cfg, model, optimizer, step, loader, hooks, **run.progress(), desc="finetune-cls")
    if val_batches and dd.main:
        final = evaluate_classifier(model, head, val_batches, labels)
        from lmforge.fileio import atomic_write_json

        atomic_write_json(run.run_dir / "eval_report.json", final)
        print(f"lmforge finetune-cls: held-out accuracy {final['val_accuracy']:.3f} (95% CI "
              f"{final['val_accuracy_lo']:.3f}-{final['val_accuracy_hi']:.3f}, {final['val_records']} records), "
              f"macro-F1 {final['val_macro_f1']:.3f} -> {run.run_dir / 'eval_report.json'}", file=sys.stderr)  # fmt: skip
        result = {**result, "eval": final}
    return {"trainable_params": trainable, **result}
