"""The cleaning steps, chosen by name from `STEPS`; each has an options dataclass set from the YAML config.

    from lmforge.data.clean.steps import configure
    step, cfg = configure("gopher_quality", {"min_words": 20})   # unknown option -> LmforgeError

A per-document step is `apply(doc, cfg) -> Document | str` (the document, possibly modified, or a
rejection reason). A whole-corpus step (dedup) is `make(cfg)`, a checker `(doc) -> reason | None`
fed every surviving document in input order, in one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.data.clean.steps.c4 import C4Config, c4
from lmforge.data.clean.steps.dedup import ExactDedup, ExactDedupConfig, MinhashDedup, MinhashDedupConfig
from lmforge.data.clean.steps.fineweb import FinewebConfig, fineweb
from lmforge.data.clean.steps.gopher import (
    GopherQualityConfig,
    GopherRepetitionConfig,
    gopher_quality,
    gopher_repetition,
)
from lmforge.data.clean.steps.html import ExtractHtmlConfig, extract_html
from lmforge.data.clean.steps.language import LanguageConfig, language
from lmforge.data.clean.steps.normalize import NormalizeConfig, normalize
from lmforge.data.clean.steps.pii import PiiConfig, pii
from lmforge.data.clean.steps.quality import QualityModelConfig, quality_model
from lmforge.data.clean.steps.substring import SubstringDedup, SubstringDedupConfig
from lmforge.data.clean.steps.toxicity import ToxicityConfig, toxicity
from lmforge.data.clean.steps.url import UrlFilterConfig, url_filter
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Step:
    name: str
    config: type
    apply: Callable | None = None  # per document
    make: Callable | None = None  # whole corpus: cfg -> checker

    @property
    def corpus(self) -> bool:
        return self.make is not None


STEPS: dict[str, Step] = {
    s.name: s
    for s in [
        Step("url_filter", UrlFilterConfig, apply=url_filter),
        Step("extract_html", ExtractHtmlConfig, apply=extract_html),
        Step("normalize", NormalizeConfig, apply=normalize),
        Step("language", LanguageConfig, apply=language),
        Step("gopher_repetition", GopherRepetitionConfig, apply=gopher_repetition),
        Step("gopher_quality", GopherQualityConfig, apply=gopher_quality),
        Step("c4", C4Config, apply=c4),
        Step("fineweb", FinewebConfig, apply=fineweb),
        Step("toxicity", ToxicityConfig, apply=toxicity),
        Step("quality_model", QualityModelConfig, apply=quality_model),
        Step("pii", PiiConfig, apply=pii),
        Step("exact_dedup", ExactDedupConfig, make=ExactDedup),
        Step("minhash_dedup", MinhashDedupConfig, make=MinhashDedup),
        Step("substring_dedup", SubstringDedupConfig, make=SubstringDedup),  # rewrites: see pipeline.corpus_stage
    ]
}
DEFAULT_STEPS = [
    "url_filter",  # passes documents without a `url`; first, so blocked pages cost no extraction
    "extract_html",
    "normalize",
    "language",
    "gopher_repetition",
    "gopher_quality",
    "pii",
    "exact_dedup",
    "minhash_dedup",
]


def configure(name: str, options: dict | None = None) -> tuple[Step, object]:
    """The step called `name` and its options dataclass filled from `options`."""
    step = STEPS.get(name)
    if step is None:
        raise LmforgeError(f"unknown cleaning step {name!r} (known: {', '.join(STEPS)})")
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(step.config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LmforgeError(f"step {name!r}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return step, step.config(**options)
