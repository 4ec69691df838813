"""`language`: identify the language with langid (offline, model inside the package), record
`language` and `language_score` (a probability) in the metadata, and keep only the configured
languages (all when `languages` is empty) scoring at least `min_score`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from lmforge.data.readers import Document


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=list)  # ISO 639-1 codes to keep, e.g. [en, zh]; empty: keep all
    min_score: float = 0.65  # reject when langid's probability for its best language is below this


@functools.cache
def identifier():
    """langid's identifier with normalized probabilities (loading the model takes a few seconds, once per process)."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def language(doc: Document, cfg: LanguageConfig) -> Document | str:
    lang, score = identifier().classify(doc.text.replace("\n", " "))
    doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(score), 4)
    if cfg.languages and lang not in cfg.languages:
        return "language_not_kept"
    if score < cfg.min_score:
        return "language_score_low"
    return doc
