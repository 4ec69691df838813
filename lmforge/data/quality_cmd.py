"""`lmforge data train-quality`: train the quality classifier of the `quality_model` cleaning step.

    lmforge data train-quality --good wiki/ books.jsonl.zst --bad crawl/ --out runs/quality \
        [--text-field text] [--ngrams 1,2] [--buckets 2**20] [--epochs 5] [--lr 1.0] [--seed 0] [--val-fraction 0.1]

Reads both sets strictly (`readers.iter_texts`: every format of lmforge/data/readers.py; an unreadable file
is an error), holds out `--val-fraction` of each class (seeded), trains the logistic regression of
`lmforge/data/quality.py` on the rest, prints held-out accuracy, precision/recall/F1 (of `good`) and AUC,
and writes MODEL_DIR/model.safetensors + MODEL_DIR/quality_model.json (report included) as one folder,
atomically. Whitespace-only documents carry no features and are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from lmforge.data import data_subparsers
from lmforge.data import quality as q
from lmforge.data.readers import iter_texts, list_files
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir


def _int(value: str) -> int:
    """An int, also written as a power: 1048576 or 2**20."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:\*\*\s*(\d+)\s*)?", value)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected an integer such as 1048576 or 2**20, got {value!r}")
    return int(m[1]) ** int(m[2]) if m[2] else int(m[1])


def _orders(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected n-gram orders such as 1,2, got {value!r}") from None


def register(subparsers) -> None:
    f, t = q.FeatureConfig(), q.TrainConfig()
    p = data_subparsers(subparsers).add_parser("train-quality", help="train a fastText-style quality classifier")
    p.add_argument("--good", nargs="+", required=True, metavar="PATH", help="high-quality documents (files/folders)")
    p.add_argument("--bad", nargs="+", required=True, metavar="PATH", help="low-quality documents (files/folders)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default text)")
    p.add_argument("--ngrams", type=_orders, default=f.ngrams, metavar="N,N", help="word n-gram orders (default 1,2)")
    p.add_argument("--buckets", type=_int, default=f.buckets, help="hashed feature buckets (default 2**20)")
    p.add_argument("--epochs", type=int, default=t.epochs, help=f"passes over the training set (default {t.epochs})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"Adagrad step size (default {t.lr})")
    p.add_argument("--seed", type=int, default=t.seed, help="data order and held-out split (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out (default 0.1)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = train_quality(
        args.good, args.bad, args.out, text_field=args.text_field, val_fraction=args.val_fraction,
        features=q.FeatureConfig(ngrams=args.ngrams, buckets=args.buckets),
        train=q.TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed),
    )  # fmt: skip
    print(format_summary(report, args.out))
    return 0


def _read(paths: list[str], text_field: str, cfg: q.FeatureConfig, what: str) -> list:
    feats = [q.featurize(text, cfg) for text, _ in iter_texts(paths, text_field) if text.strip()]
    if not feats:
        raise LmforgeError(f"--{what} {' '.join(map(str, paths))}: no documents (all texts are empty)")
    return feats


def train_quality(
    good: list[str | Path],
    bad: list[str | Path],
    out: str | Path,
    *,
    features: q.FeatureConfig | None = None,
    train: q.TrainConfig | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
) -> dict:
    """Train on `good` (label 1) vs `bad` (label 0), write the model folder `out`, return the training report."""
    features, train = features or q.FeatureConfig(), train or q.TrainConfig()
    if not 0 < val_fraction < 1:
        raise LmforgeError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and not (out / q.CONFIG_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out}: exists and is not a quality model folder; not overwriting it")

    def names(paths):
        return {str(f.resolve()) if isinstance(f, Path) else str(f) for f in list_files(paths)}

    both = names(good) & names(bad)
    if both:
        raise LmforgeError(f"{min(both)}: given as both --good and --bad")
    t0 = time.perf_counter()
    feats_good = _read(good, text_field, features, "good")
    feats_bad = _read(bad, text_field, features, "bad")
    feats = feats_good + feats_bad
    labels = np.array([1] * len(feats_good) + [0] * len(feats_bad))
    if min(len(feats_good), len(feats_bad)) < 2:
        raise LmforgeError(
            f"need at least 2 documents of each class to hold some out, got {len(feats_good)} good, {len(feats_bad)} bad"
        )
    read_s = time.perf_counter() - t0
    tr, va = q.split(labels, val_fraction, train.seed)
    t0 = time.perf_counter()
    weight, bias, history = q.train(q.stack([feats[i] for i in tr]), labels[tr], features.buckets, train)
    train_s = time.perf_counter() - t0
    p_val = q.sigmoid(q.logits(weight, bias, q.stack([feats[i] for i in va])))
    report = {
        "good": [str(p) for p in good],
        "bad": [str(p) for p in bad],
        "text_field": text_field,
        "documents": {"good": len(feats_good), "bad": len(feats_bad), "train": len(tr), "held_out": len(va)},
        "train": {
            **dataclasses.asdict(train),
            "optimizer": "adagrad",
            "loss_per_epoch": history,
            "val_fraction": val_fraction,
        },
        "held_out": q.metrics(labels[va], p_val, 0.5),
        "seconds": {"read_and_featurize": round(read_s, 3), "train": round(train_s, 3)},
    }
    model = q.QualityModel(weight, bias, features, threshold=0.5, info={"report": report})
    with atomic_dir(out) as tmp:
        q.save(model, tmp)
    return report


def format_summary(report: dict, out: str | Path) -> str:
    d, m = report["documents"], report["held_out"]
    head = (
        f"train-quality: {out}: {d['good']:,} good + {d['bad']:,} bad documents ({d['train']:,} train,"
        f" {d['held_out']:,} held out), {report['train']['epochs']} epochs in {report['seconds']['train']:.1f}s"
    )
    scores = (
        f"  held out: accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  recall {m['recall']:.4f}"
        f"  F1 {m['f1']:.4f}  AUC {m['auc']:.4f}  (threshold {m['threshold']})"
    )
    return f"{head}\n{scores}"
