"""Which documents are held out (a validation split, a tokenizer's test text): a share of each input file.

    from lmforge.data.holdout import FileHoldout
    held = FileHoldout(0.05)
    for doc in iter_docs(inputs):
        if held.assign(doc.file, nbytes):   # True: this document goes to the held-out side
            ...
    held.files      # per input file: {"train_docs", "train_bytes", "val_docs", "val_bytes"}

Used by `lmforge data tokenize` (the val split) and `lmforge tokenizer train` (bytes per token on
held-out text). Every (1/fraction)-th document of the stream is held out, the first about
(1/fraction)/2 in, and the stream is the input files one after another, each split into documents
(`textsplit.py`). So a file of n documents gives n * fraction of them (within one), spread through
it, and a folder of many one-document files gives the same share by file. What this replaces lost
a language: a `.txt` file was one document, and "hold out the last document" held out a whole
Chinese file behind an English one. Documents are counted per file on each side, so a report can
show that no file (and no language in its own file) is missing from either side. The choice
depends only on the order of documents: deterministic, and the same for any number of workers.
"""

from __future__ import annotations

import math

from lmforge.errors import LmforgeError


class FileHoldout:
    def __init__(self, fraction: float, flag: str = "--val-fraction", sides: tuple[str, str] = ("train", "val")):
        if not 0 <= fraction < 1:
            raise LmforgeError(f"{flag} must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.sides = sides  # names of the kept and the held-out side in the counts
        self._seen = 0  # documents assigned so far
        self.files: dict[str, dict[str, int]] = {}

    def assign(self, file: str, nbytes: int) -> bool:
        """Count one document of `file` of `nbytes` bytes; True when it is held out."""
        # The n-th document is held out when round(n * fraction) steps up (+0.5: the first one k/2 documents in).
        n = self._seen = self._seen + 1
        held = math.floor(n * self.fraction + 0.5) > math.floor((n - 1) * self.fraction + 0.5)
        self._count(file, nbytes, held, +1)
        return held

    def move(self, file: str, nbytes: int, held: bool) -> None:
        """Move one counted document of `file` to the other side (`held` is where it goes)."""
        self._count(file, nbytes, not held, -1)
        self._count(file, nbytes, held, +1)

    def _count(self, file: str, nbytes: int, held: bool, sign: int) -> None:
        c = self.files.setdefault(file, {f"{s}_{k}": 0 for s in self.sides for k in ("docs", "bytes")})
        side = self.sides[held]
        c[f"{side}_docs"] += sign
        c[f"{side}_bytes"] += sign * nbytes

    def totals(self) -> dict[str, int]:
        keys = [f"{s}_{k}" for s in self.sides for k in ("docs", "bytes")]
        return {k: sum(c[k] for c in self.files.values()) for k in keys}

    def whole_files(self, held: bool) -> list[str]:
        """Files whose every document is on the held-out side (`held`), or on the kept side."""
        this, other = self.sides[held], self.sides[not held]
        return [f for f, c in self.files.items() if c[f"{this}_docs"] > 0 and c[f"{other}_docs"] == 0]
