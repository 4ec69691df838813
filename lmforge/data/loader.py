"""A resumable, rank-aware loader over token shards.

    loader = TokenLoader(data_dir, "train", batch_size=16, seq_len=256, rank=0, world_size=1)
    x, y = loader.next_batch()          # (B, T) inputs and next-token targets
    state = loader.state_dict()         # saved in the checkpoint; load_state_dict() resumes exactly

The split's shards are read as one token stream (documents already separated by
the end token). Each micro-batch is the next B*T+1 tokens: rank r of W reads
the r-th chunk and all ranks advance by W*B*T, so W processes with batch B see
exactly the tokens one process with batch W*B sees, in the same rows.
At the end of the stream it wraps around and counts an epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import load_index, open_shard
from lmforge.errors import LmforgeError


class TokenStream:
    """The concatenated tokens of one split, read by absolute position through memory maps."""

    def __init__(self, data_dir: str | Path, split: str, index: dict):
        self.shards = [open_shard(Path(data_dir) / s["file"]) for s in index["splits"].get(split, [])]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.total = int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            pos = (start + filled) % self.total
            i = int(np.searchsorted(self.starts, pos, side="right") - 1)
            off = pos - int(self.starts[i])
            take = min(n - filled, len(self.shards[i]) - off)
            out[filled : filled + take] = self.shards[i][off : off + take]
            filled += take
        return out


class TokenLoader:
    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, tokenizer_hash=None, device="cpu"):
        index = load_index(data_dir, expected_tokenizer_hash=tokenizer_hash)
        self.stream = TokenStream(data_dir, split, index)
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.device = torch.device(device)
        need = batch_size * seq_len * world_size + 1
        if self.stream.total < need:
            raise LmforgeError(
                f"{data_dir}: the {split} split has {self.stream.total} tokens, fewer than one batch needs "
                f"({need} = batch_size x seq_len x processes + 1); use more data or a smaller batch"
            )
        self.position = 0  # tokens consumed by all ranks together, over all epochs

    @property
    def epoch(self) -> int:
        return self.position // self.stream.total

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * self.T
        buf = torch.from_numpy(self.stream.read(self.position + self.rank * n, n + 1))
        self.position += n * self.world
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def row_starts(self) -> list[int]:
        """Where each row of the next batch starts in the stream (tokens since the first epoch began). The rows of
        all ranks together are one run of the stream, so a row's start is the same however many processes read it:
        randomness drawn from it (masks, spans) does not change with the world size."""
        n = self.B * self.T
        return [self.position + self.rank * n + j * self.T for j in range(self.B)]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class LoaderView:
    """A batch source built on a TokenLoader (`self.loader`) whose state is the loader's: masked-LM, span and blank
    batches (lmforge/train/mlm.py, span.py, glm.py) draw each row's randomness from where the row starts in the
    stream (`row_starts`), so they save nothing else and a run on N processes draws what a run on one does."""

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def row_rngs(self, seed: int) -> list[np.random.Generator]:
        """One generator per row of the next batch, seeded by (seed, where the row starts in the stream)."""
        return [np.random.default_rng([seed, start]) for start in self.loader.row_starts()]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
