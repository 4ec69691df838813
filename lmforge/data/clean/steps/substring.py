"""`substring_dedup`: exact-substring deduplication across documents (Lee et al. 2022, "Deduplicating Training
Data Makes Language Models Better", their ExactSubstr), a whole-corpus step that rewrites documents.

    lmforge data clean --input raw/ --out clean/ --steps normalize,exact_dedup,substring_dedup
    steps: [..., {name: substring_dedup, min_bytes: 50, min_doc_bytes: 50, max_bytes: 134217728}]

What it removes: every span of at least `min_bytes` bytes (of the UTF-8 text) that also occurs earlier in the
corpus, in an earlier document or earlier in the same document; so of a repeated span the first occurrence in
document order stays and the later ones go. Repeats inside one document count too (a footer printed twice on a
page, a refrain): the simpler rule, and the one the suffix array gives directly. Periodic text is the edge case:
a line of 80 `=` repeats itself from the second byte on, so all but its first character goes. A document that
lost something keeps its text minus the removed spans (nothing else changes, whitespace included) and gets
`metadata["substring_dedup"] = {"removed_bytes", "spans"}`; if less than `min_doc_bytes` bytes of non-blank text
are left it is rejected with "too_short_after_removal" (its record keeps the text it came in with).

How, in O(n) memory and O(n log n) time for n bytes of text: the survivors' UTF-8 bytes are concatenated, each
document followed by a 0xFF byte (a byte UTF-8 never uses); libdivsufsort (through pydivsufsort) builds the
suffix array, Kasai et al.'s algorithm the LCP array, and from them the longest previous factor LPF[i]: the
length of the longest prefix of the suffix at i that also starts at some j < i (Crochemore & Ilie 2008). A
match is cut at the end of its document, which makes every separator behave as a unique symbol (two suffixes
that agree past a separator agree up to it, so capping at the document end gives the match inside the document).
Then byte i is removed if some s <= i has min(LPF[s], end - s) >= min_bytes and reaches past i: a running
maximum of s + match over the array. The removed runs are shrunk to whole characters (a character goes only if
all its bytes go), so Chinese and every other multi-byte text is never cut inside a character; what is left of a
span may then be a few bytes shorter than `min_bytes`.

Deviations from the paper: the threshold is in bytes of text (the paper used 50 BPE tokens, about 200 bytes of
English; 50 bytes is about 10 English words or 16 Chinese characters: raise it for web crawls), and the suffix
array is built in memory, not on disk in parallel pieces.

Memory: about 19 bytes per byte of text while the arrays exist (text, suffix array, LCP and LPF as int32, and
libdivsufsort's and Kasai's work space; measured), plus the documents, held until the step has seen them all.
Speed: about 3 MB of text a second on one core (9.5 MB of Shakespeare in 3 s). `max_bytes` caps the text of one
suffix array (default 128 MiB: about 2.5 GB of memory, a minute or so): a larger corpus is deduplicated in
consecutive shards of at most `max_bytes`, independently, so a span repeated across two shards is not removed (a
one-line warning says so); a single document larger than `max_bytes` is a shard of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

SEPARATOR = 0xFF  # never a byte of UTF-8


@dataclass
class SubstringDedupConfig:
    min_bytes: int = 50  # a repeated span shorter than this stays
    min_doc_bytes: int = 50  # a document cut to fewer non-blank bytes than this is rejected
    max_bytes: int = 1 << 27  # text per suffix array; a larger corpus goes in independent shards of this size

    def __post_init__(self):
        for name, low in (("min_bytes", 1), ("min_doc_bytes", 0), ("max_bytes", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LmforgeError(f"step 'substring_dedup': {name} must be an integer >= {low}, got {value!r}")


def removed_mask(text: np.ndarray, min_bytes: int) -> np.ndarray:
    """The bytes of `text` (documents each followed by SEPARATOR, uint8) inside a span of at least `min_bytes`
    bytes that also starts earlier, shrunk to whole UTF-8 characters."""
    from pydivsufsort import divsufsort, kasai, longest_previous_factor

    n = len(text)
    sa = divsufsort(text)
    lcp = kasai(text, sa)
    match = longest_previous_factor(text, sa, lcp)
    del sa, lcp
    pos = np.arange(n, dtype=match.dtype)
    seps = np.flatnonzero(text == SEPARATOR)
    end = np.repeat(seps.astype(match.dtype), np.diff(seps, prepend=-1))  # each byte's document end
    np.minimum(match, end - pos, out=match)  # a match stops at its document's end
    del end
    reach = np.where(match >= min_bytes, pos + match, 0)
    del match
    np.maximum.accumulate(reach, out=reach)
    keep = reach <= pos
    del reach, pos
    # A character stays if any of its bytes stays: spread "kept" from a continuation byte back to its lead
    # byte, then forward over the continuation bytes (at most 3 in UTF-8). Separators are never removed.
    cont = (text & 0xC0) == 0x80
    for _ in range(3):
        keep[:-1] |= keep[1:] & cont[1:]
    for _ in range(3):
        keep[1:] |= keep[:-1] & cont[1:]
    return ~keep


class SubstringDedup:
    """A rewriting whole-corpus step: `rewrite(docs)` reads the survivors (in shards of `max_bytes`) and yields
    `(doc, reason)` for each, in order; see the module docstring and `pipeline.corpus_stage`."""

    def __init__(self, cfg: SubstringDedupConfig):
        self.cfg = cfg
        self.shards = 0

    def rewrite(self, docs: Iterable[Document]) -> Iterator[tuple[Document, str | None]]:
        batch: list[Document] = []
        data: list[bytes] = []
        size = 0
        for doc in docs:
            b = doc.text.encode("utf-8", "surrogatepass")  # a lone surrogate from JSON survives the round trip
            if batch and size + len(b) + 1 > self.cfg.max_bytes:
                yield from self._shard(batch, data)
                batch, data, size = [], [], 0
            batch.append(doc)
            data.append(b)
            size += len(b) + 1
        if batch:
            yield from self._shard(batch, data)

    def _shard(self, docs: list[Document], data: list[bytes]) -> Iterator[tuple[Document, str | None]]:
        self.shards += 1
        if self.shards == 2:
            print(
                f"substring_dedup: the survivors hold more than max_bytes={self.cfg.max_bytes:,} bytes of text; "
                "deduplicating in independent shards (a span repeated across shards stays)",
                file=sys.stderr,
            )
        buf = bytearray([SEPARATOR]).join(data)
        buf.append(SEPARATOR)
        text = np.frombuffer(buf, dtype=np.uint8)  # writable: pydivsufsort needs that
        removed = removed_mask(text, self.cfg.min_bytes)
        lengths = np.fromiter((len(b) + 1 for b in data), dtype=np.int64, count=len(data))
        starts = np.cumsum(lengths) - lengths
        hit = np.flatnonzero(removed)
        owner = np.searchsorted(starts, hit, side="right") - 1
        n_removed = np.bincount(owner, minlength=len(docs))
        run_starts = hit[np.diff(hit, prepend=-2) != 1]  # the first byte of each removed run
        n_spans = np.bincount(np.searchsorted(starts, run_starts, side="right") - 1, minlength=len(docs))
        for i, doc in enumerate(docs):
            if n_removed[i] == 0:
                yield doc, None
                continue
            a, b = int(starts[i]), int(starts[i]) + len(data[i])
            left = text[a:b][~removed[a:b]].tobytes()
            doc.metadata["substring_dedup"] = {"removed_bytes": int(n_removed[i]), "spans": int(n_spans[i])}
            if len(left.strip()) < self.cfg.min_doc_bytes:
                yield doc, "too_short_after_removal"
                continue
            doc.text = left.decode("utf-8", "surrogatepass")
            yield doc, None
