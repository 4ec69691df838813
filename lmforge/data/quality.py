"""Model-based quality filtering: a fastText-style linear classifier on hashed word n-grams, in numpy.

    lmforge data train-quality --good wiki/ --bad crawl/ --out runs/quality    # trains it (quality_cmd.py)
    steps: [{name: quality_model, model: runs/quality}]                         # `lmforge data clean` step

    from lmforge.data import quality
    model = quality.load("runs/quality")
    p_good = quality.predict_proba(model, ["some text", "more text"])

Features (`featurize`): the words of the text as the cleaning steps count them (`clean.steps.text.words`:
whitespace tokens, CJK runs segmented by jieba, else one word per CJK character, so Chinese gets word or
character n-grams), lowercased; every word n-gram for n in `ngrams` is hashed into one of `buckets` ids;
an id's value is its count, and the vector is L2-normalized. The hash is stable across processes,
machines and Python versions (never Python's salted `hash()`): a word's hash is BLAKE2b-64 of its UTF-8
bytes (little-endian); an n-gram folds its words' hashes as h = h * 0x100000001B3 + h_word (mod 2**64,
FNV-1's 64-bit prime), adds n * 0x9E3779B97F4A7C15 so that orders differ, is mixed by the splitmix64
finalizer, and taken mod `buckets`. Changing any of this changes every saved model's meaning: the ids
of a fixed text are pinned in tests/test_data_quality.py.

Model: logistic regression, p(good | x) = sigmoid(w . x + b), one weight per bucket. Deviation from
fastText (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification"): with two labels its
averaged embeddings followed by a softmax are a linear function of the bag of n-grams, so we train that
linear model directly, without the low-rank factorization, on the L2- (not L1-) normalized bag, with
mini-batch Adagrad (Duchi et al. 2011) on the log loss instead of SGD with a linearly decaying rate.
Updates are sparse: only the buckets a batch touches change. No regularization: `epochs` is the knob.

Saved as MODEL_DIR/model.safetensors (`weight` float32 [buckets], `bias` float32 [1]; nothing pickled)
and MODEL_DIR/quality_model.json (feature config, threshold, word splitting, training report).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.clean.steps.text import word_backend, words
from lmforge.errors import LmforgeError

FORMAT = "lmforge-quality-model"
VERSION = 1
CONFIG_FILE = "quality_model.json"
WEIGHTS_FILE = "model.safetensors"

_PRIME = np.uint64(0x100000001B3)
_ORDER = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class FeatureConfig:
    ngrams: tuple[int, ...] = (1, 2)  # word n-gram orders
    buckets: int = 2**20  # hashed feature ids are 0 .. buckets - 1
    lowercase: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ngrams", tuple(int(n) for n in self.ngrams))
        if not self.ngrams or any(n < 1 for n in self.ngrams):
            raise LmforgeError(f"ngrams must be positive word n-gram orders, e.g. 1,2; got {list(self.ngrams)}")
        if not 1 <= self.buckets <= 2**31:
            raise LmforgeError(f"buckets must be in [1, 2**31], got {self.buckets}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    lr: float = 1.0  # Adagrad step size (tried 0.1-2 on benchmarks/quality_model.py: 1-2 best)
    batch_size: int = 32
    seed: int = 0  # data order each epoch, and the held-out split

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise LmforgeError(f"epochs and batch size must be >= 1 and lr > 0, got {self}")


@dataclass
class QualityModel:
    weight: np.ndarray  # float32 [buckets]
    bias: float
    features: FeatureConfig
    threshold: float = 0.5  # documents with p(good) below it are rejected by the `quality_model` step
    info: dict = field(default_factory=dict)  # the rest of quality_model.json (training report, ...)


# --- features ---


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arithmetic wraps mod 2**64)."""
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return h ^ (h >> np.uint64(31))


def featurize(text: str, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) of the hashed word n-grams of `text`: sorted unique int64 ids in [0, buckets), float32 counts."""
    ws = words(text.lower() if cfg.lowercase else text)
    hs = np.fromiter((_word_hash(w) for w in ws), dtype=np.uint64, count=len(ws))
    parts = []
    for n in cfg.ngrams:
        if len(hs) < n:
            continue
        h = hs[: len(hs) - n + 1].copy()
        for k in range(1, n):
            h = h * _PRIME + hs[k : len(hs) - n + 1 + k]
        parts.append(_mix(h + np.uint64((n * _ORDER) % 2**64)) % np.uint64(cfg.buckets))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids, counts = np.unique(np.concatenate(parts), return_counts=True)
    return ids.astype(np.int64), counts.astype(np.float32)


@dataclass
class Rows:
    """Documents as a sparse matrix (CSR): row r's ids are `ids[indptr[r]:indptr[r+1]]`, values L2-normalized."""

    indptr: np.ndarray
    ids: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))


def stack(features: list[tuple[np.ndarray, np.ndarray]]) -> Rows:
    """`featurize` outputs of several documents as one `Rows`, each row L2-normalized."""
    lengths = np.array([len(ids) for ids, _ in features], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if not features:
        return Rows(indptr, np.zeros(0, np.int64), np.zeros(0, np.float32))
    ids = np.concatenate([i for i, _ in features]).astype(np.int64)
    counts = np.concatenate([c for _, c in features]).astype(np.float32)
    rows = np.repeat(np.arange(len(features)), lengths)
    norms = np.sqrt(np.bincount(rows, weights=counts.astype(np.float64) ** 2, minlength=len(features)))
    return Rows(indptr, ids, (counts / np.maximum(norms, 1e-12)[rows]).astype(np.float32))


def featurize_all(texts: list[str], cfg: FeatureConfig) -> Rows:
    return stack([featurize(t, cfg) for t in texts])


# --- the model ---


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def logits(weight: np.ndarray, bias: float, rows: Rows) -> np.ndarray:
    contrib = weight[rows.ids].astype(np.float64) * rows.values
    return np.bincount(rows.row_of_entry(), weights=contrib, minlength=len(rows)) + bias


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def train(rows: Rows, y: np.ndarray, buckets: int, cfg: TrainConfig) -> tuple[np.ndarray, float, list[float]]:
    """Logistic regression by mini-batch Adagrad with sparse updates: (weight float32 [buckets], bias, loss/epoch)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(buckets, np.float64)
    g2 = np.zeros(buckets, np.float64)  # Adagrad's running sum of squared gradients, per bucket
    b, b_g2, eps = 0.0, 0.0, 1e-8
    rng = np.random.default_rng(cfg.seed)
    starts, lengths = rows.indptr[:-1], np.diff(rows.indptr)
    history = []
    for _ in range(cfg.epochs):
        order = rng.permutation(len(rows))
        for first in range(0, len(order), cfg.batch_size):
            batch = order[first : first + cfg.batch_size]
            sel = np.concatenate([np.arange(starts[r], starts[r] + lengths[r]) for r in batch])
            pos = np.repeat(np.arange(len(batch)), lengths[batch])
            ids, vals = rows.ids[sel], rows.values[sel]
            z = np.bincount(pos, weights=w[ids] * vals, minlength=len(batch)) + b
            err = (sigmoid(z) - y[batch]) / len(batch)  # d(mean log loss)/dz
            touched, inv = np.unique(ids, return_inverse=True)
            g = np.bincount(inv, weights=err[pos] * vals, minlength=len(touched))
            g2[touched] += g * g
            w[touched] -= cfg.lr * g / (np.sqrt(g2[touched]) + eps)
            gb = float(err.sum())
            b_g2 += gb * gb
            b -= cfg.lr * gb / (math.sqrt(b_g2) + eps)
        history.append(round(log_loss(y, sigmoid(logits(w, b, rows))), 6))
    return w.astype(np.float32), float(b), history


def predict_proba(model: QualityModel, texts: list[str]) -> np.ndarray:
    """p(good) for each text."""
    return sigmoid(logits(model.weight, model.bias, featurize_all(list(texts), model.features)))


def score(model: QualityModel, text: str) -> float:
    ids, counts = featurize(text, model.features)
    if len(ids) == 0:
        return float(sigmoid(np.array([model.bias]))[0])
    z = float(model.weight[ids].astype(np.float64) @ counts / np.linalg.norm(counts.astype(np.float64))) + model.bias
    return float(sigmoid(np.array([z]))[0])


# --- evaluation ---


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count 1/2)."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based mean rank of each distinct score
    return float((avg_rank[inv][y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision/recall/F1 of the `good` class (p >= threshold predicts good) and AUC."""
    y, pred = np.asarray(y).astype(bool), np.asarray(p) >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"accuracy": float((pred == y).mean()) if len(y) else float("nan"), "precision": precision}
    out.update(recall=recall, f1=f1, auc=auc(y, p), n=len(y), threshold=threshold)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded shuffle of each class, `val_fraction` of it held out (at least one)."""
    rng = np.random.default_rng(seed)
    train_rows, val_rows = [], []
    for cls in (1, 0):
        rows = rng.permutation(np.flatnonzero(np.asarray(labels) == cls))
        n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
        val_rows.append(rows[:n_val])
        train_rows.append(rows[n_val:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(val_rows))


# --- files ---


def save(model: QualityModel, folder: Path) -> None:
    """Write the model into `folder` (an existing, empty folder: callers wrap it in `fileio.atomic_dir`)."""
    from safetensors.numpy import save_file

    weights = folder / WEIGHTS_FILE
    tensors = {"weight": model.weight.astype(np.float32), "bias": np.array([model.bias], np.float32)}
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    weights.chmod(0o644)  # safetensors creates it owner-only
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "features": {**dataclasses.asdict(model.features), "ngrams": list(model.features.ngrams)},
        "word_splitting": word_backend(),
        "threshold": model.threshold,
        **model.info,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load(folder: str | Path) -> QualityModel:
    """The model saved in `folder`; an `LmforgeError` naming the file when it is missing or corrupt."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise LmforgeError(f"{folder}: no such quality model folder (make one with `lmforge data train-quality`)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{cfg_path}: not found (not a folder from `lmforge data train-quality`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LmforgeError(f"{cfg_path}: not a {FORMAT} version {VERSION} file")
    try:
        features = FeatureConfig(**meta["features"])
        threshold = float(meta["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise LmforgeError(f"{cfg_path}: bad or missing `features`/`threshold` ({e})") from None
    if meta.get("word_splitting") != word_backend():
        raise LmforgeError(
            f"{cfg_path}: trained with {meta.get('word_splitting')} word splitting, this process has {word_backend()}"
            " (pip install jieba, or retrain)"
        )
    try:
        with safe_open(str(weights), framework="np") as f:
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except FileNotFoundError:
        raise LmforgeError(f"{weights}: not found") from None
    except (OSError, SafetensorError, ValueError) as e:  # a missing tensor name is a SafetensorError too
        raise LmforgeError(f"{weights}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    if weight.shape != (features.buckets,) or bias.shape != (1,) or not np.isfinite(weight).all():
        raise LmforgeError(f"{weights}: expected finite weight [{features.buckets}] and bias [1], got {weight.shape}")
    info = {k: v for k, v in meta.items() if k not in ("format", "version", "features", "word_splitting", "threshold")}
    return QualityModel(weight.astype(np.float32), float(bias[0]), features, threshold, info)
