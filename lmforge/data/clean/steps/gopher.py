"""`gopher_quality` and `gopher_repetition`: the document rules of Gopher's MassiveWeb filter
(Rae et al. 2021, "Scaling Language Models", appendix A.1.1), thresholds from the paper as defaults.

Deviations for Chinese/Japanese/Korean (the paper's rules are for English): words are counted with
`text.words` (jieba, else one word per CJK character: see `text.word_backend()`), and for a
CJK-dominant document the mean-word-length rule is skipped (Chinese words are 1-4 characters, the
rule's 3-10 band would reject all of them) and the stop-word rule uses `stop_words_cjk`.
The rules record their measurements in `metadata["gopher"]`.

`gopher_quality` with `compat: datatrove` (default `paper`) follows datatrove's GopherQualityFilter instead,
for runs that must agree with it: words are spaCy-like tokens (`text.datatrove_words`: every punctuation mark
is a word, so the 80%-of-words-have-a-letter rule counts them, where the paper's whitespace words carry their
punctuation); the word-count and mean-length rules count only words that are not all punctuation; the '#' and
the ellipsis ratios are checked apart; bullet and ellipsis lines are counted over all lines, blank ones too,
with only '•' and '-' as bullets; the stop-word rule counts distinct stop words, case-sensitively. The CJK
deviations above hold in both modes (datatrove's mean-length rule would reject all Chinese).
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from lmforge.data.clean.steps.text import datatrove_words, is_cjk_text, words
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

BULLETS = ("•", "●", "○", "■", "□", "▪", "‣", "–", "-", "*", "·")
ELLIPSES = ("...", "…")


@dataclass
class GopherQualityConfig:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and ellipses per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one alphabetic character
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    stop_words_cjk: list[str] = field(
        default_factory=lambda: ["的", "是", "在", "了", "和", "有", "不", "这", "我", "也"]
    )
    compat: str = "paper"  # or "datatrove": the rules as datatrove's GopherQualityFilter applies them (see above)

    def __post_init__(self):
        check_compat("gopher_quality", self.compat)


COMPAT = ("paper", "datatrove")


def check_compat(step: str, compat: str) -> None:
    if compat not in COMPAT:
        raise LmforgeError(f"step {step!r}: compat must be one of {', '.join(COMPAT)}, got {compat!r}")


def gopher_quality(doc: Document, cfg: GopherQualityConfig) -> Document | str:
    text = doc.text
    cjk = is_cjk_text(text)
    if cfg.compat == "datatrove":
        return _gopher_quality_datatrove(doc, cfg, cjk)
    ws = words(text)
    n = len(ws)
    stats = doc.metadata.setdefault("gopher", {})
    stats["words"] = n
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    if not cjk:
        mean = sum(map(len, ws)) / n
        stats["mean_word_length"] = round(mean, 3)
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines and sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return "bullet_lines"
    if lines and sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "ellipsis_lines"
    if _alpha_words(ws) / n < cfg.min_alpha_words_ratio:
        return "alpha_words_ratio"
    stop = set(cfg.stop_words_cjk if cjk else cfg.stop_words)
    if sum(map(stop.__contains__, map(str.lower, ws))) < cfg.min_stop_words:
        return "too_few_stop_words"
    return doc


def _gopher_quality_datatrove(doc: Document, cfg: GopherQualityConfig, cjk: bool) -> Document | str:
    """`gopher_quality` as datatrove 0.10's GopherQualityFilter applies it (see the module docstring)."""
    text = doc.text
    ws = datatrove_words(text)
    n = len(ws) or 1
    has_alnum = _alnum_char().search
    content = list(filter(has_alnum, ws))  # datatrove: words with a character outside its punctuation set
    stats = doc.metadata.setdefault("gopher", {})
    stats["words"] = len(content)
    if len(content) < cfg.min_words:
        return "too_few_words"
    if len(content) > cfg.max_words:
        return "too_many_words"
    if not cjk:
        mean = sum(map(len, content)) / len(content)
        stats["mean_word_length"] = round(mean, 3)
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"
    if max(text.count("#"), sum(text.count(e) for e in ELLIPSES)) / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = text.splitlines() or [""]
    if sum(ln.lstrip().startswith(("•", "-")) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return "bullet_lines"
    if sum(ln.rstrip().endswith(ELLIPSES) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "ellipsis_lines"
    if _alpha_words(ws) / n < cfg.min_alpha_words_ratio:
        return "alpha_words_ratio"
    if len(set(cfg.stop_words_cjk if cjk else cfg.stop_words).intersection(ws)) < cfg.min_stop_words:
        return "too_few_stop_words"
    return doc


@functools.cache
def _alnum_char() -> re.Pattern:
    """A letter or a digit: datatrove's test for "not a punctuation-only word" (its punctuation set holds the ASCII
    and common CJK marks and symbols; this counts any non-alphanumeric word as punctuation)."""
    return re.compile(r"[^\W_]")


def _alpha_words(ws: list[str]) -> int:
    """The number of words with an alphabetic character. `str.isalpha` (all alphabetic) settles most words, in
    C; only the others are searched for one."""
    return sum(map(str.isalpha, ws)) + len(list(filter(_alpha_char().search, itertools.filterfalse(str.isalpha, ws))))


@functools.cache
def _alpha_char() -> re.Pattern:
    """A regex matching exactly the characters `str.isalpha()` is true for (built once: ~0.1 s); searching a
    word with it is twice as fast as `any(c.isalpha() for c in w)`. `[^\\W\\d_]` would also match numerals
    such as '½' or 'Ⅻ', which are not alphabetic."""
    ranges: list[list[int]] = []
    for c in range(sys.maxunicode + 1):
        if chr(c).isalpha():
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]")


@dataclass
class GopherRepetitionConfig:
    max_dup_line_ratio: float = 0.30  # share of lines that repeat an earlier line
    max_dup_para_ratio: float = 0.30
    max_dup_line_char_ratio: float = 0.20  # share of characters in repeated lines
    max_dup_para_char_ratio: float = 0.20
    # most frequent n-gram's characters / all characters, for n = 2, 3, 4
    top_ngram_max_ratio: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # characters in n-grams that occur more than once / all characters, for n = 5..10
    dup_ngram_max_ratio: dict = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


def _dup_stats(parts: list[str]) -> tuple[int, int]:
    """(number of parts that repeat an earlier part, characters in those parts)."""
    seen: set[str] = set()
    count = chars = 0
    for p in parts:
        if p in seen:
            count += 1
            chars += len(p)
        else:
            seen.add(p)
    return count, chars


def _ngram_levels(ws: list[str], lo: int) -> Iterator[tuple[int, list[tuple[str, ...]], Sequence[int], Counter]]:
    """For n = lo, lo + 1, ... (while any is left): (n, the n-grams that may occur more than once with their start
    positions, in text order, and their counts), computed lazily so a caller can stop at the first n over its limit.

    Level n keeps only the positions whose n-gram occurs more than once: an n-gram that repeats extends an
    (n-1)-gram that does, so after level `lo` (all positions) each level is built from the few repeated
    positions of the one before, in C (`map` over the positions), instead of every n-gram of every length.
    An n-gram that is left out occurs once: it is never the most frequent one unless none repeats, and never
    a repetition.
    """
    grams = list(zip(*(ws[k:] for k in range(lo))))
    starts: Sequence[int] = range(len(grams))
    n, word = lo, ws.__getitem__
    while grams:
        counts = Counter(grams)
        yield n, grams, starts, counts
        n += 1
        repeated = itertools.compress(starts, map((1).__lt__, map(counts.__getitem__, grams)))
        starts = list(itertools.takewhile((len(ws) - n + 1).__gt__, repeated))  # an n-gram fits from there
        grams = list(zip(*(map(word, map(k.__add__, starts)) for k in range(n))))


def _top_ngram_chars(grams: list[tuple[str, ...]], counts: Counter) -> int:
    """Characters of the most frequent n-gram times its count (0 if none repeats); ties go to the n-gram seen
    first (`Counter` keeps the order of first occurrence, and `grams` is in text order)."""
    gram, count = counts.most_common(1)[0]
    return count * sum(map(len, gram)) if count > 1 else 0


def _dup_ngram_chars(grams: list[tuple[str, ...]], starts: Sequence[int], n: int, lens: list[int]) -> int:
    """Characters of the words covered by n-grams seen earlier in the text, each word counted once; `lens[j]` is
    the number of characters of the first j words."""
    first = dict(zip(reversed(grams), reversed(starts)))  # built back to front: each n-gram's first position
    chars = end = 0
    for i in itertools.compress(starts, map(operator.ne, map(first.__getitem__, grams), starts)):
        if i + n > end:  # the union of the spans [i, i + n), in increasing i
            chars += lens[i + n] - lens[max(i, end)]
            end = i + n
    return chars


def gopher_repetition(doc: Document, cfg: GopherRepetitionConfig) -> Document | str:
    text = doc.text
    total = len(text) or 1
    paras = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    for parts, max_ratio, max_chars, what in (
        (paras, cfg.max_dup_para_ratio, cfg.max_dup_para_char_ratio, "paragraph"),
        (lines, cfg.max_dup_line_ratio, cfg.max_dup_line_char_ratio, "line"),
    ):
        count, chars = _dup_stats(parts)
        if parts and count / len(parts) > max_ratio:
            return f"duplicate_{what}s"
        if chars / total > max_chars:
            return f"duplicate_{what}_chars"
    ws = words(text)
    word_chars = sum(map(len, ws)) or 1
    ns = [int(n) for n in (*cfg.top_ngram_max_ratio, *cfg.dup_ngram_max_ratio) if int(n) >= 1]
    levels = _ngram_levels(ws, min(ns, default=1))
    done: dict[int, tuple] = {}  # filled from `levels` as far as the checks below need

    def level(n: int) -> tuple | None:  # (n-grams, starts, counts) of the n-grams that may repeat; None: none
        while n >= 1 and n not in done and (nxt := next(levels, None)) is not None:
            done[nxt[0]] = nxt[1:]
        return done.get(n)

    for n, max_ratio in sorted(cfg.top_ngram_max_ratio.items()):
        lv = level(int(n))
        if lv and _top_ngram_chars(lv[0], lv[2]) / word_chars > max_ratio:
            return f"top_{n}gram"
    lens = [0, *itertools.accumulate(map(len, ws))]
    for n, max_ratio in sorted(cfg.dup_ngram_max_ratio.items()):
        lv = level(int(n))
        if lv and _dup_ngram_chars(lv[0], lv[1], int(n), lens) / word_chars > max_ratio:
            return f"duplicate_{n}grams"
    return doc
