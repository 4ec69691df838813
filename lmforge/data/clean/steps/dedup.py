"""Whole-corpus dedup stages: `exact_dedup` and `minhash_dedup`. Each is a stateful checker built
once per run and fed the surviving documents in input order; the first of a set of duplicates is
kept and the later ones are rejected, with the kept one's id in `metadata["duplicate_of"]`.

`exact_dedup` hashes the text after NFKC, lowercasing and collapsing whitespace (blake2b, 16 bytes
per document kept in memory). `minhash_dedup` is MinHash + LSH (Broder 1997; the banding of
Leskovec et al., "Mining of Massive Datasets", ch. 3) with datasketch: word n-gram shingles, or
character n-grams for a CJK-dominant text; `bands` x `rows` permutations; an LSH candidate counts as
a duplicate when its estimated Jaccard similarity is at least `threshold`. The LSH index lives in
memory (about bands x 8 bytes + the signature per kept document).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from lmforge.data.clean.document import Document
from lmforge.data.clean.steps.text import is_cjk_text

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


class MinhashDedup:
    def __init__(self, cfg: MinhashDedupConfig):
        from datasketch import MinHash, MinHashLSH

        self.cfg = cfg
        self._minhash = MinHash
        self.lsh = MinHashLSH(num_perm=cfg.bands * cfg.rows, params=(cfg.bands, cfg.rows))
        self.signatures: dict[str, object] = {}
        self._key = 0

    def __call__(self, doc: Document) -> str | None:
        grams = shingles(doc.text, self.cfg)
        if not grams:
            return None
        m = self._minhash(num_perm=self.cfg.bands * self.cfg.rows, seed=self.cfg.seed)
        m.update_batch(list(grams))
        best, best_sim = None, 0.0
        for key in self.lsh.query(m):
            sim = m.jaccard(self.signatures[key][1])
            if sim > best_sim:
                best, best_sim = self.signatures[key][0], sim
        if best is not None and best_sim >= self.cfg.threshold:
            doc.metadata["duplicate_of"] = best
            doc.metadata["minhash_similarity"] = round(best_sim, 3)
            return "near_duplicate"
        key = str(self._key)  # ids need not be unique; the index uses its own keys
        self._key += 1
        self.lsh.insert(key, m)
        self.signatures[key] = (doc.id, m)
        return None
