"""Split a plain-text file into documents: what `.txt` inputs mean to every command that reads them.

    from lmforge.data.textsplit import TextSplit, split_text
    for doc in split_text(text, TextSplit()):          # blank-line paragraphs, grouped up to 16 KiB
        print(doc.line, doc.text)
    split_text(text, TextSplit(doc_sep="<|endoftext|>"))  # documents between separators

`lmforge tokenizer train`, `lmforge data tokenize` and `lmforge data clean` all read `.txt` files
through here (`--doc-sep`, `--doc-bytes`, `--max-doc-bytes`), so a file is split the same way for
the tokenizer, the shards and the cleaning steps.

A plain-text file is a stream of documents, not one: a user's `input.txt` (nanoGPT's layout), a
book, or a crawl dump holds many. Treating it as one document breaks what needs several: a
validation split, held-out text for the tokenizer, per-document filters and dedup.

- Default: paragraphs are the text between blank lines (lines that are empty or only whitespace);
  a document is the longest run of whole consecutive paragraphs that fits in `doc_bytes` UTF-8
  bytes (the blank lines between them kept). A file smaller than `doc_bytes` is one document, so a
  folder of articles stays one document per article. A paragraph larger than `doc_bytes` (a file
  with no blank lines: one paragraph per line, as Chinese text often is) is cut at line boundaries
  into pieces of at most `doc_bytes`.
- `doc_sep`: documents are the text between occurrences of the separator (e.g. `<|endoftext|>`,
  or three newlines), newlines around it dropped; a document larger than `max_doc_bytes` is cut at
  line boundaries.
- A line longer than the limit (a 200 MB file with no newline) is cut inside the line at the last
  space or sentence punctuation (Chinese `。！？；，` included) before the limit, else at the limit
  on a character boundary; `SplitStats.cut_lines` counts such lines so the reader can warn.

Documents are exact slices of the text: nothing is rewritten, and only whitespace between
documents (and the separators) is dropped. Whitespace-only documents are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from lmforge.errors import LmforgeError

DOC_BYTES = 16 << 10  # ~4k tokens of English, ~7k of Chinese at a small vocabulary
MAX_DOC_BYTES = 1 << 20
BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # a newline, then one or more whitespace-only lines
# Where a line may be cut when it must be: after the last whitespace or sentence punctuation (ASCII and CJK).
LAST_BREAK = re.compile(r"(?s:.*)[\s.!?;,。！？；，、…]")


@dataclass(frozen=True)
class TextSplit:
    """How `.txt` files split into documents (flags `--doc-sep`, `--doc-bytes`, `--max-doc-bytes`)."""

    doc_sep: str | None = None  # separator between documents; None: blank-line paragraphs grouped up to doc_bytes
    doc_bytes: int = DOC_BYTES  # paragraph mode: largest document (whole paragraphs grouped up to it)
    max_doc_bytes: int = MAX_DOC_BYTES  # with doc_sep: larger documents are cut at line boundaries

    def __post_init__(self):
        if self.doc_sep is not None and not self.doc_sep:
            raise LmforgeError("--doc-sep must not be empty")
        if self.doc_sep is not None and not isinstance(self.doc_sep, str):
            raise LmforgeError(f"doc_sep must be a string, got {self.doc_sep!r}")
        for name in ("doc_bytes", "max_doc_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise LmforgeError(f"{name} must be an integer, got {value!r}")
            if value < 64:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 64, got {getattr(self, name)}")

    def describe(self) -> str:
        if self.doc_sep is None:
            return f"blank-line paragraphs grouped up to {self.doc_bytes:,} bytes"
        return f"documents separated by {self.doc_sep!r} (cut at {self.max_doc_bytes:,} bytes)"

    def to_dict(self) -> dict:
        return {"doc_sep": self.doc_sep, "doc_bytes": self.doc_bytes, "max_doc_bytes": self.max_doc_bytes}


@dataclass(frozen=True)
class TextSplitFields:
    """The fields of a command's config that say how its `.txt` inputs split (a `TextSplit`); flags of the same
    names (`--doc-sep`, `--doc-bytes`, `--max-doc-bytes`)."""

    # in .txt files, documents are separated by this (e.g. '<|endoftext|>'; \n and \t read as escapes);
    # unset: blank-line paragraphs grouped up to doc_bytes
    doc_sep: str | None = None
    doc_bytes: int = DOC_BYTES  # largest .txt document when grouping paragraphs
    max_doc_bytes: int = MAX_DOC_BYTES  # with doc_sep: longer documents are cut at line boundaries

    def text_split(self) -> TextSplit:
        sep = None if self.doc_sep is None else self.doc_sep.replace("\\n", "\n").replace("\\t", "\t")
        return TextSplit(sep, self.doc_bytes, self.max_doc_bytes)


@dataclass
class Piece:
    text: str
    line: int  # 1-based line of the text where the document starts


@dataclass
class SplitStats:
    docs: int = 0
    cut_lines: int = 0  # lines longer than the limit, cut inside the line
    separators: int = 0  # occurrences of doc_sep (doc_sep mode)


def nbytes(text: str) -> int:
    """UTF-8 size of `text`."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _spans(text: str, sep: re.Pattern | str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the non-blank parts of text[start:end] between matches of `sep`, surrounding newlines cut."""
    pos = start
    if isinstance(sep, re.Pattern):
        matches = (m.span() for m in sep.finditer(text, start, end))
    else:
        matches = _find_all(text, sep, start, end)
    for m_start, m_end in matches:
        yield from _trimmed(text, pos, m_start)
        pos = m_end
    yield from _trimmed(text, pos, end)


def _find_all(text: str, sep: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    i = text.find(sep, start, end)
    while i >= 0:
        yield i, i + len(sep)
        i = text.find(sep, i + len(sep), end)


def _trimmed(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end and text[start] in "\r\n":
        start += 1
    while end > start and text[end - 1] in "\r\n":
        end -= 1
    if start < end and not text[start:end].isspace():
        yield start, end


def _fits(text: str, start: int, end: int, limit: int) -> bool:
    return end - start <= limit and nbytes(text[start:end]) <= limit  # a character is at least one byte


def _cut_line(text: str, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    """Cut one over-long line text[start:end] into pieces of at most `limit` bytes, at a break where there is one
    in the second half of the piece."""
    while not _fits(text, start, end, limit):
        stop = min(end, start + limit)
        while not _fits(text, start, stop, limit):  # multi-byte characters: fewer of them fit
            stop = start + max(1, (stop - start) * 3 // 4)
        m = LAST_BREAK.match(text, start + (stop - start) // 2, stop)
        cut = m.end() if m else stop
        yield start, cut
        start = cut
    if start < end:
        yield start, end


def _cut_lines(text: str, start: int, end: int, limit: int, stats: SplitStats) -> Iterator[tuple[int, int]]:
    """Group the lines of text[start:end] into pieces of at most `limit` bytes (over-long lines cut inside)."""
    piece_start, size, pos = start, 0, start
    while pos < end:
        nl = text.find("\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        n = nbytes(text[pos:line_end])
        if size and size + n > limit:
            yield piece_start, pos
            piece_start, size = pos, 0
        if n > limit:
            stats.cut_lines += 1
            yield from _cut_line(text, pos, line_end, limit)
            piece_start, size = line_end, 0
        else:
            size += n
        pos = line_end
    if piece_start < end:
        yield piece_start, end


def _grouped(text: str, split: TextSplit, stats: SplitStats) -> Iterator[tuple[int, int]]:
    """Paragraph mode: runs of whole paragraphs of at most doc_bytes; longer paragraphs cut at lines."""
    limit = split.doc_bytes
    group: tuple[int, int] | None = None
    size = 0
    for start, end in _spans(text, BLANK_LINES, 0, len(text)):
        n = nbytes(text[start:end])
        if group is not None and (grown := size + nbytes(text[group[1] : start]) + n) <= limit:
            group, size = (group[0], end), grown
            continue
        if group is not None:
            yield group
            group = None
        if n > limit:
            yield from _cut_lines(text, start, end, limit, stats)
        else:
            group, size = (start, end), n
    if group is not None:
        yield group


def _separated(text: str, split: TextSplit, stats: SplitStats) -> Iterator[tuple[int, int]]:
    stats.separators = text.count(split.doc_sep)
    for start, end in _spans(text, split.doc_sep, 0, len(text)):
        if nbytes(text[start:end]) > split.max_doc_bytes:
            yield from _cut_lines(text, start, end, split.max_doc_bytes, stats)
        else:
            yield start, end


def split_text(text: str, split: TextSplit, stats: SplitStats | None = None) -> Iterator[Piece]:
    """The documents of one text file's contents, in order, each with the line it starts on."""
    stats = stats if stats is not None else SplitStats()
    spans = _separated(text, split, stats) if split.doc_sep is not None else _grouped(text, split, stats)
    line, pos = 1, 0
    for span in spans:
        trimmed = next(_trimmed(text, *span), None)  # a piece cut at lines keeps no newline at either end
        if trimmed is None:
            continue
        start, end = trimmed
        piece = text[start:end]
        line += text.count("\n", pos, start)
        pos = start
        stats.docs += 1
        yield Piece(piece, line)


def split_file_text(text: str, split: TextSplit, path: str) -> Iterator[Piece]:
    """`split_text` for the contents of file `path`, with a one-line warning afterwards about how it split (a
    separator that never occurs, lines cut inside): what every `.txt` reader does."""
    from lmforge.errors import warn

    stats = SplitStats()
    yield from split_text(text, split, stats)
    for note in split_notes(path, split, stats):
        warn(note)


def split_notes(path: str, split: TextSplit, stats: SplitStats) -> list[str]:
    """One-line warnings about how a file split: a separator that never occurs, lines cut inside."""
    notes = []
    if split.doc_sep is not None and stats.separators == 0:
        notes.append(f"{path}: --doc-sep {split.doc_sep!r} never occurs; read as one document"
                     + (f" cut into {stats.docs} at line boundaries" if stats.docs > 1 else ""))  # fmt: skip
    if stats.cut_lines:
        limit = split.doc_bytes if split.doc_sep is None else split.max_doc_bytes
        notes.append(f"{path}: {stats.cut_lines} line(s) longer than {limit:,} bytes cut inside the line "
                     f"(at spaces or punctuation)")  # fmt: skip
    return notes
