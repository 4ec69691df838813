"""`fineweb`: the FineWeb quality rules (Penedo et al. 2024, "The FineWeb Datasets", sec. 3.3; datatrove's
`FineWebQualityFilter`), the paper's thresholds as defaults.

    steps: [{name: fineweb}, ...]   or   {name: fineweb, short_line_thr: 0.8, new_line_ratio: 0.4}

Over the non-blank lines, each stripped, in this order (the reason is the rule's name, as in datatrove):
  - "line_punct_ratio": reject if fewer than `line_punct_thr` of the lines end in terminal punctuation;
  - "short_line_ratio": reject if more than `short_line_thr` of the lines have at most `short_line_length`
    characters (datatrove's `<=`);
  - "char_dup_ratio": reject if the characters of lines repeating an earlier line are more than
    `char_duplicates_ratio` of the text's characters (newlines not counted);
  - "list_ratio": reject if the text has more than `new_line_ratio` newlines (blank lines included) per word.
The measured values go to `metadata["fineweb"]`, so a rejected record shows how far over it was.

Deviations for Chinese/Japanese (the paper tuned the rules on English): terminal punctuation also
includes 。！？… and the full-width forms ．｡ and closing 」』 (the `c4` step's set, plus those two); words
are `text.words` (jieba, else one word per CJK character) rather than datatrove's per-language tokenizers,
which also count punctuation marks as words: here a newline ratio comes out slightly higher for the same
text. `short_line_length` counts characters in every script; 30 characters of Chinese carry more than 30
of English, so a Chinese corpus may want a smaller value (FineWeb-2 tunes such thresholds per language).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.data.clean.steps.c4 import TERMINAL as C4_TERMINAL
from lmforge.data.clean.steps.gopher import _dup_stats
from lmforge.data.clean.steps.text import words
from lmforge.data.readers import Document

TERMINAL = (*C4_TERMINAL, "．", "｡")  # + the full-width full stop and the half-width ideographic full stop


@dataclass
class FinewebConfig:
    line_punct_thr: float = 0.12  # reject if fewer lines than this end in terminal punctuation
    line_punct_exclude_zero: bool = False  # datatrove's option: True lets documents with no such line through
    short_line_thr: float = 0.67  # reject if more lines than this are short
    short_line_length: int = 30  # a line of at most this many characters is short
    char_duplicates_ratio: float = 0.01  # reject if more characters than this are in repeated lines
    new_line_ratio: float = 0.3  # reject if more newlines than this per word
    stop_chars: list[str] = field(default_factory=lambda: list(TERMINAL))  # terminal punctuation


def fineweb(doc: Document, cfg: FinewebConfig) -> Document | str:
    text = doc.text
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:  # nothing to measure; the pipeline rejects empty output itself
        return doc
    stats = doc.metadata.setdefault("fineweb", {})
    stops = tuple(cfg.stop_chars)

    ratio = sum(ln.endswith(stops) for ln in lines) / len(lines)
    stats["line_punct_ratio"] = round(ratio, 4)
    if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return "line_punct_ratio"

    ratio = sum(len(ln) <= cfg.short_line_length for ln in lines) / len(lines)
    stats["short_line_ratio"] = round(ratio, 4)
    if ratio > cfg.short_line_thr:
        return "short_line_ratio"

    ratio = _dup_stats(lines)[1] / max(len(text.replace("\n", "")), 1)
    stats["char_dup_ratio"] = round(ratio, 4)
    if ratio > cfg.char_duplicates_ratio:
        return "char_dup_ratio"

    ratio = text.count("\n") / max(len(words(text)), 1)
    stats["list_ratio"] = round(ratio, 4)
    if ratio > cfg.new_line_ratio:
        return "list_ratio"
    return doc
