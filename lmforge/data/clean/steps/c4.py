"""`c4`: the C4 cleaning rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", sec. 2.2).

Per line: keep only lines ending in terminal punctuation, with at least `min_words_per_line` words,
without the word "javascript", and not a cookie/terms/privacy notice; citation markers like `[1]`
are removed. Per document: reject pages containing "lorem ipsum" or a curly bracket (code), and
pages left with fewer than `min_sentences` sentences. Deviations: Chinese/Japanese full-width
terminal punctuation (。！？…) counts as terminal and CJK words are counted as in `text.words`;
the bad-words list rule is not applied (no list ships with lmforge).

With `compat: datatrove` (default `paper`) the rules are applied as datatrove's C4QualityFilter applies them,
for runs that must agree with it: a line's words are its whitespace-separated pieces (counted before citations
are removed; CJK lines still as `text.words`); the terminal marks are . ? ! " ' (and the CJK ones), and a line
ending in "..." is dropped; "lorem ipsum" and "{" reject the page only on a line that passed the line rules
before them; sentences are counted per kept line as spaCy's sentencizer finds them (`text.datatrove_sentences`).
datatrove's thresholds differ from the paper's too (3 words per line, 5 sentences): set
`min_words_per_line: 3, min_sentences: 5` with it to match datatrove's defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmforge.data.clean.steps.gopher import check_compat
from lmforge.data.clean.steps.text import CJK_CHAR, datatrove_sentences, words
from lmforge.data.readers import Document

TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』")
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?。！？]+(?:[\"'”’」』])?(?=\s|$)|[。！？]")


@dataclass
class C4Config:
    min_words_per_line: int = 5
    min_sentences: int = 3
    max_word_length: int = 1000  # lines with a longer "word" are dropped (datatrove's C4 filter does the same)
    policy_phrases: list[str] = field(
        default_factory=lambda: ["terms of use", "privacy policy", "cookie policy", "uses cookies",
                                 "use of cookies", "use cookies"]
    )  # fmt: skip
    reject_curly_bracket: bool = True
    reject_lorem_ipsum: bool = True
    compat: str = "paper"  # or "datatrove": the rules as datatrove's C4QualityFilter applies them (see above)

    def __post_init__(self):
        check_compat("c4", self.compat)


DATATROVE_TERMINAL = (".", "?", "!", '"', "'", "。", "！", "？", "」", "』")
DATATROVE_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")


def _c4_datatrove(doc: Document, cfg: C4Config) -> Document | str:
    """`c4` as datatrove 0.10's C4QualityFilter applies it (see the module docstring)."""
    kept, dropped, sentences = [], 0, 0
    for line in doc.text.splitlines():
        line = line.strip()
        ws = words(line) if CJK_CHAR.search(line) else line.split()
        if ws and max(map(len, ws)) > cfg.max_word_length:
            dropped += 1
            continue
        line = DATATROVE_CITATION.sub("", line)
        if not line.endswith(DATATROVE_TERMINAL) or line.endswith("..."):
            dropped += 1
            continue
        if len(ws) < cfg.min_words_per_line:
            dropped += 1
            continue
        low = line.lower()
        if cfg.reject_lorem_ipsum and "lorem ipsum" in low:
            return "lorem_ipsum"
        if "javascript" in low:
            dropped += 1
            continue
        if cfg.reject_curly_bracket and "{" in line:
            return "curly_bracket"
        if any(p in low for p in cfg.policy_phrases):
            dropped += 1
            continue
        sentences += datatrove_sentences(line)
        kept.append(line)
    doc.metadata["c4_lines_dropped"] = dropped
    if sentences < cfg.min_sentences:
        return "too_few_sentences"
    doc.text = "\n".join(kept).strip()
    return doc


def c4(doc: Document, cfg: C4Config) -> Document | str:
    if cfg.compat == "datatrove":
        return _c4_datatrove(doc, cfg)
    lower = doc.text.lower()
    if cfg.reject_lorem_ipsum and "lorem ipsum" in lower:
        return "lorem_ipsum"
    if cfg.reject_curly_bracket and "{" in doc.text:
        return "curly_bracket"
    kept, dropped = [], 0
    for line in doc.text.split("\n"):
        if "[" in line:
            line = CITATION.sub("", line)
        line = line.strip()
        if not line:
            continue
        # Any one rule drops a line; the cheap ones go first, so most dropped lines are never split into words.
        if not line.endswith(TERMINAL):
            dropped += 1
            continue
        low = line.lower()
        if "javascript" in low or any(p in low for p in cfg.policy_phrases):
            dropped += 1
            continue
        ws = words(line)
        if len(ws) < cfg.min_words_per_line or (ws and max(map(len, ws)) > cfg.max_word_length):
            dropped += 1
            continue
        kept.append(line)
    text = "\n".join(kept)
    doc.metadata["c4_lines_dropped"] = dropped
    if len(SENTENCE_END.findall(text)) < cfg.min_sentences:
        return "too_few_sentences"
    doc.text = text
    return doc
