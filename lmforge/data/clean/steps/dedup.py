"""Whole-corpus dedup stages: `exact_dedup` and `minhash_dedup`. Each is a stateful checker built
once per run and fed the surviving documents in input order; the first of a set of duplicates is
kept and the later ones are rejected, with the kept one's id in `metadata["duplicate_of"]`.

`exact_dedup` hashes the text after NFKC, lowercasing and collapsing whitespace (blake2b, 16 bytes
per document kept in memory). `minhash_dedup` is MinHash + LSH (Broder 1997; the banding of
Leskovec et al., "Mining of Massive Datasets", ch. 3) with datasketch: word n-gram shingles, or
character n-grams for a CJK-dominant text; `bands` x `rows` permutations; an LSH candidate counts as
a duplicate when its estimated Jaccard similarity is at least `threshold`. The LSH index lives in
memory, in numpy arrays: about 4 x bands x rows + 12 x bands bytes per kept document, plus its id
(1,040 bytes + the id at the default 20 x 10; ~2.0 KB measured at 100k documents, with the arrays'
spare room: see BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from lmforge.data.clean.steps.text import is_cjk_text
from lmforge.data.readers import Document

SPACES = re.compile(r"\s+")


@dataclass
class ExactDedupConfig:
    lowercase: bool = True


class ExactDedup:
    def __init__(self, cfg: ExactDedupConfig):
        self.cfg = cfg
        self.seen: dict[bytes, str] = {}

    def key(self, text: str) -> bytes:
        text = SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()
        if self.cfg.lowercase:
            text = text.lower()
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def __call__(self, doc: Document) -> str | None:
        first = self.seen.setdefault(self.key(doc.text), doc.id)
        if first != doc.id:
            doc.metadata["duplicate_of"] = first
            return "exact_duplicate"
        return None


@dataclass
class MinhashDedupConfig:
    shingle_size: int = 5  # words per shingle
    cjk_shingle_size: int = 5  # characters per shingle for CJK-dominant text
    bands: int = 20
    rows: int = 10  # bands x rows permutations; LSH threshold about (1/bands)^(1/rows) = 0.74
    threshold: float = 0.7  # estimated Jaccard similarity at or above which a candidate is a duplicate
    seed: int = 1


def shingles(text: str, cfg: MinhashDedupConfig) -> set[bytes]:
    text = SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    if is_cjk_text(text):
        chars = text.replace(" ", "")
        n = cfg.cjk_shingle_size
        grams = {chars[i : i + n] for i in range(max(1, len(chars) - n + 1))}
    else:
        ws = text.split(" ")
        n = cfg.shingle_size
        grams = {" ".join(ws[i : i + n]) for i in range(max(1, len(ws) - n + 1))}
    return {g.encode("utf-8") for g in grams if g}


class _BandIndex:
    """A multimap from 64-bit band keys to document numbers, in arrays rather than per-document objects: sorted
    `keys`/`docs` arrays (12 bytes an entry) searched with `np.searchsorted`, plus a small dict of the latest
    entries, merged into the arrays (a re-sort) each time it reaches `buffer` entries."""

    def __init__(self, buffer: int = 1 << 17):
        import numpy as np

        self.np = np
        self.keys = np.empty(0, np.uint64)
        self.docs = np.empty(0, np.uint32)
        self.recent: dict[int, list[int]] = {}
        self.n_recent = 0
        self.buffer = buffer

    def find(self, keys) -> set[int]:
        np = self.np
        out: set[int] = set()
        if len(self.keys):
            lo = np.searchsorted(self.keys, keys, "left")
            hi = np.searchsorted(self.keys, keys, "right")
            for a, b in zip(lo[lo < hi].tolist(), hi[lo < hi].tolist()):
                out.update(self.docs[a:b].tolist())
        for k in keys.tolist():
            out.update(self.recent.get(k, ()))
        return out

    def add(self, keys, doc: int) -> None:
        for k in keys.tolist():
            self.recent.setdefault(k, []).append(doc)
        self.n_recent += len(keys)
        if self.n_recent >= self.buffer:
            self._merge()

    def _merge(self) -> None:
        np = self.np
        items = [(k, d) for k, ds in self.recent.items() for d in ds]
        keys = np.concatenate([self.keys, np.fromiter((k for k, _ in items), np.uint64, len(items))])
        docs = np.concatenate([self.docs, np.fromiter((d for _, d in items), np.uint32, len(items))])
        order = np.argsort(keys, kind="stable")
        self.keys, self.docs = keys[order], docs[order]
        self.recent, self.n_recent = {}, 0


class MinhashDedup:
    """Signatures from datasketch's `MinHash`; the index is ours, in numpy arrays: each kept document costs its
    signature (`bands x rows` uint32: datasketch's hash values are below 2**32), `bands` 12-byte index entries
    and its id. datasketch's `MinHashLSH` kept a MinHash object and `bands` byte strings per document (~9.8 KB
    a document at 100k documents; see BENCHMARKS.md). A band's key is a 64-bit hash of its rows and its number,
    so keys of different documents meet only when a band is identical (or on a 2**-64 collision, which the
    similarity check below then rejects)."""

    def __init__(self, cfg: MinhashDedupConfig):
        import numpy as np
        from datasketch import MinHash

        self.cfg = cfg
        self.np = np
        self._minhash = MinHash
        n_perm = cfg.bands * cfg.rows
        rng = np.random.default_rng(cfg.seed)
        self._mult = rng.integers(1, 2**63, size=(1, cfg.rows), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._band_salt = rng.integers(0, 2**63, size=cfg.bands, dtype=np.uint64)
        self.index = _BandIndex()
        self.sigs = np.empty((1024, n_perm), np.uint32)  # row i: kept document i's signature; grown by doubling
        self.ids: list[str] = []

    def _band_keys(self, sig):
        np = self.np
        rows = sig.reshape(self.cfg.bands, self.cfg.rows).astype(np.uint64)
        with np.errstate(over="ignore"):  # multiply-add hashing, modulo 2**64 on purpose
            return (rows * self._mult).sum(axis=1, dtype=np.uint64) ^ self._band_salt

    def __call__(self, doc: Document) -> str | None:
        np = self.np
        grams = shingles(doc.text, self.cfg)
        if not grams:
            return None
        m = self._minhash(num_perm=self.cfg.bands * self.cfg.rows, seed=self.cfg.seed)
        m.update_batch(list(grams))
        sig = m.hashvalues.astype(np.uint32)
        keys = self._band_keys(sig)
        best, best_sim = None, 0.0
        cands = sorted(self.index.find(keys))
        if cands:
            sims = (self.sigs[cands] == sig).mean(axis=1)  # estimated Jaccard similarity, as MinHash.jaccard
            i = int(np.argmax(sims))  # the earliest of the most similar
            best, best_sim = self.ids[cands[i]], float(sims[i])
        if best is not None and best_sim >= self.cfg.threshold:
            doc.metadata["duplicate_of"] = best
            doc.metadata["minhash_similarity"] = round(best_sim, 3)
            return "near_duplicate"
        n = len(self.ids)  # ids need not be unique; the index uses document numbers
        if n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs)])
        self.sigs[n] = sig
        self.ids.append(doc.id)
        self.index.add(keys, n)
        return None
