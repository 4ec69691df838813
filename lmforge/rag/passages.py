"""Split a document into passages: sections by headings, paragraphs packed up to a word budget, with overlap.

    from lmforge.rag.passages import split_passages
    for p in split_passages(text, max_words=128, overlap=16):
        p.heading, p.line, p.text        # "Intro > Setup", 12, "To install ..."

Why this shape: a retriever ranks passages, and the reader (the model's prompt) has a context
budget, so a passage must be short enough that several fit, and whole enough to hold an answer.
Sections never share a passage (a heading starts a new one, and every passage carries its
heading path, which also gives BM25 the section's title words). Inside a section, whole
paragraphs are packed greedily up to `max_words`; a paragraph over the budget is cut at
sentence ends (English `.!?`, Chinese `。！？；`), and a sentence over it at word boundaries.
Consecutive passages of one section share up to `overlap` words of whole units (paragraphs or
sentences), so an answer that straddles a cut is whole in one of them.

Headings: Markdown `#` lines, and a title line underlined (or over- and underlined) by a run of
one of `= - * ~ ^ " # +` (reStructuredText, Python's docs, setext Markdown); underline levels rank
in the order they first appear, as reStructuredText does.

A "word" is a run of letters/digits, or one CJK character (Chinese has no spaces; one character
is about one word's worth of text): `count_words`. Passages are exact slices of the document's
paragraphs, so `line` (1-based) points a citation at the source.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
_UNDERLINE = re.compile(r"^([=\-*~^\"#+])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？；])")


@dataclass
class Passage:
    text: str
    heading: str  # the heading path it is under ("Guide > Install"), "" before the first heading
    line: int  # 1-based line of the document where it starts


def count_words(text: str) -> int:
    return sum(1 for _ in WORD.finditer(text))


@dataclass
class _Unit:
    text: str
    line: int
    sep: str  # what joins it to the unit before it: the original whitespace inside a paragraph, else a blank line
    words: int


def _blocks(text: str):
    """(first line number, lines) of each run of non-blank lines."""
    block, start = [], 0
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not block:
                start = i
            block.append(line)
        elif block:
            yield start, block
            block = []
    if block:
        yield start, block


def _sections(text: str):
    """(heading path, first line, paragraph lines) for each paragraph, headings taken out."""
    path: list[tuple[int, str]] = []
    underline_levels: dict[str, int] = {}

    def enter(level: int, title: str):
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title.strip()))

    for start, lines in _blocks(text):
        i = 0
        while i < len(lines):
            atx = _ATX.match(lines[i])
            over = _UNDERLINE.match(lines[i])
            if atx:
                enter(len(atx.group(1)), atx.group(2))
                i += 1
                continue
            if over and i + 2 < len(lines) and _UNDERLINE.match(lines[i + 2]):
                char = "o" + over.group(1)  # over- and underlined titles rank apart from underlined ones
                enter(underline_levels.setdefault(char, 10 + len(underline_levels)), lines[i + 1])
                i += 3
                continue
            under = _UNDERLINE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if under and len(lines[i].strip()) <= 2 * len(lines[i + 1].strip()) + 8 and not over:
                enter(underline_levels.setdefault(under.group(1), 10 + len(underline_levels)), lines[i])
                i += 2
                continue
            # the paragraph runs to the next heading line inside this block, if any
            j = i + 1
            while (
                j < len(lines)
                and not _ATX.match(lines[j])
                and not (j + 1 < len(lines) and _UNDERLINE.match(lines[j + 1]) and not _UNDERLINE.match(lines[j]))
            ):
                j += 1
            yield " > ".join(t for _, t in path), start + i, "\n".join(lines[i:j])
            i = j


def _units(paragraph: str, line: int, max_words: int) -> list[_Unit]:
    """The paragraph whole, or cut at sentence ends (then word boundaries) into pieces of at most max_words."""
    n = count_words(paragraph)
    if n <= max_words:
        return [_Unit(paragraph, line, "\n\n", n)]
    pieces, last = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        pieces.append((last, m.start(), m.end()))
        last = m.end()
    pieces.append((last, len(paragraph), len(paragraph)))
    units: list[_Unit] = []
    sep = "\n\n"
    for begin, end, after in pieces:
        sentence = paragraph[begin:end]
        for off, piece in _word_windows(sentence, max_words):
            at = begin + off
            units.append(_Unit(piece, line + paragraph.count("\n", 0, at), sep, count_words(piece)))
            sep = " "
        sep = paragraph[end:after] or ""
    return [u for u in units if u.text.strip()]


def _word_windows(text: str, max_words: int):
    """(offset, slice) pieces of `text` holding at most max_words words each, cut before a word."""
    starts = [m.start() for m in WORD.finditer(text)]
    if len(starts) <= max_words:
        yield 0, text
        return
    cuts = starts[::max_words] + [len(text)]
    cuts[0] = 0
    for a, b in itertools.pairwise(cuts):
        yield a, text[a:b].rstrip()


def split_passages(text: str, max_words: int = 128, overlap: int = 16) -> list[Passage]:
    """The document's passages, in order (see the module docstring)."""
    if max_words < 8:
        raise ValueError(f"max_words must be at least 8, got {max_words}")
    if not 0 <= overlap < max_words // 2:
        raise ValueError(f"overlap must be in [0, max_words/2), got {overlap}")
    sections: list[tuple[str, list[_Unit]]] = []
    for heading, line, paragraph in _sections(text):
        if not sections or sections[-1][0] != heading:
            sections.append((heading, []))
        sections[-1][1].extend(_units(paragraph, line, max_words))
    out: list[Passage] = []
    for heading, units in sections:
        i = 0
        while i < len(units):
            j, words = i, 0
            while j < len(units) and (j == i or words + units[j].words <= max_words):
                words += units[j].words
                j += 1
            text_ = units[i].text + "".join(u.sep + u.text for u in units[i + 1 : j])
            out.append(Passage(text_, heading, units[i].line))
            if j == len(units):
                break
            k = j  # the next passage starts with the last whole units of this one that fit in `overlap`
            while k - 1 > i and sum(u.words for u in units[k - 1 : j]) <= overlap:
                k -= 1
            i = k
    return out
