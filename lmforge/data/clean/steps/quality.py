"""`quality_model`: score each document with a classifier from `lmforge data train-quality`
(lmforge/data/quality.py), record p(good) as `quality_score` in the metadata, and reject documents scoring
below `threshold` (default: the model's own, from its quality_model.json; 0.5 as trained).

    steps: [{name: normalize}, {name: quality_model, model: runs/quality, threshold: 0.3}]

The model is loaded when the step is configured, so a missing or corrupt folder is a one-line
`LmforgeError` before any document is read. Loaded models are cached per process by path (and the
files' modification times, so a retrained model is picked up): the pipeline configures its steps in
the main process before forking its workers, which then share that copy; a worker started otherwise
loads it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.data import quality
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

_cache: dict[tuple, quality.QualityModel] = {}


def cached_model(path: str | Path) -> quality.QualityModel:
    """`quality.load(path)`, once per process for each version of the folder's files."""
    folder = Path(path).resolve()
    stats = []
    for name in (quality.CONFIG_FILE, quality.WEIGHTS_FILE):
        try:
            st = (folder / name).stat()
            stats.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append(None)  # `load` names what is missing
    key = (str(folder), *stats)
    if key not in _cache:
        _cache.clear()  # at most one version of one model per process in practice; never grow unbounded
        _cache[key] = quality.load(folder)
    return _cache[key]


@dataclass
class QualityModelConfig:
    model: str = ""  # folder written by `lmforge data train-quality` (required)
    threshold: float | None = None  # reject below this p(good); None: the model's threshold

    def __post_init__(self):
        if not self.model:
            raise LmforgeError(
                "step 'quality_model': option `model` (a `lmforge data train-quality` folder) is required"
            )
        self._model = cached_model(self.model)  # not a dataclass field: not an option, not in repr
        if self.threshold is None:
            self.threshold = self._model.threshold
        if not 0 <= float(self.threshold) <= 1:
            raise LmforgeError(f"step 'quality_model': threshold must be in [0, 1], got {self.threshold}")


def _fmt(x: float) -> str:
    return f"{x:.2f}" if round(x, 2) == x else f"{x:g}"


def quality_model(doc: Document, cfg: QualityModelConfig) -> Document | str:
    score = quality.score(cfg._model, doc.text)
    doc.metadata["quality_score"] = round(score, 4)
    if score < cfg.threshold:
        shown = math.floor(score * 100) / 100  # rounded down: a score of 0.499 never reads "0.50 < 0.50"
        return f"quality score {shown:.2f} < {_fmt(cfg.threshold)}"
    return doc
