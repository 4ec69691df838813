"""SFT examples: conversations -> (ids, loss targets), packed into fixed-length rows without leakage.

    examples, report = encode_conversations(ChatFormat(tok_dir), conversations, seq_len=512)
    loader = PackedLoader(examples, batch_size=8, seq_len=512, seed=0)
    batch = loader.next_batch()    # idx, targets (-100 off the answers), positions, doc_ids, num_tokens

Length policy: a conversation longer than `seq_len + 1` tokens keeps its first
`seq_len + 1` tokens (the earliest turns; the rest is cut, counted as `truncated`);
if no answer token survives the cut it is dropped, counted as `dropped_no_answer_left`.

Packing: several conversations share one row of `seq_len` tokens, placed by best-fit
decreasing (each goes into the fullest row it still fits in), which wastes far less
than padding every conversation to the longest. Packing must not change what the model
sees: each conversation's positions restart at 0 and `doc_ids` make attention
block-diagonal, so a packed row gives the same losses as its conversations run one
by one (tests/test_sft.py checks this). Unused tail positions are padding: their
targets are -100 and they attend only to each other.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError

IGNORE = -100


@dataclass
class Example:
    ids: list[int]  # the rendered conversation's tokens
    trained: list[bool]  # True on answer tokens (the loss targets)


def encode_conversations(fmt, conversations: list[list[dict]], seq_len: int) -> tuple[list[Example], dict]:
    """Render and mask each conversation; apply the length policy; return examples and counts."""
    examples, truncated, dropped = [], 0, 0
    tokens = trained_tokens = 0
    for conv in conversations:
        ids, trained = fmt.encode_with_mask(conv)
        if len(ids) > seq_len + 1:
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            truncated += 1
        # Token 0 is never a target (nothing predicts it), so an answer must start at 1 or later.
        if not any(trained[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, trained))
        tokens += len(ids)
        trained_tokens += sum(trained[1:])
    report = {
        "conversations": len(conversations),
        "examples": len(examples),
        "truncated": truncated,
        "dropped_no_answer_left": dropped,
        "tokens": tokens,
        "answer_tokens": trained_tokens,
    }
    if not examples:
        raise LmforgeError(f"no usable conversation: {dropped} of {len(conversations)} lost their answer to the cut")
    return examples, report


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of `lengths` grouped into bins of at most `capacity`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), kept sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of length {n} exceeds capacity {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def build_rows(examples: list[Example], seq_len: int, pad_id: int, seed: int) -> dict[str, torch.Tensor]:
    """Pack all examples into rows (shuffled by `seed`): idx, targets, positions, doc_ids, each (rows, seq_len)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)  # ties in length land in a seed-dependent order
    lengths = [len(examples[i].ids) - 1 for i in order]
    bins = pack(lengths, seq_len)
    rng.shuffle(bins)
    R = len(bins)
    idx = torch.full((R, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((R, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((R, seq_len), dtype=torch.long)
    doc_ids = torch.full((R, seq_len), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for d, k in enumerate(members):
            ex = examples[order[k]]
            n = len(ex.ids) - 1
            ids = torch.tensor(ex.ids, dtype=torch.long)
            keep = torch.tensor(ex.trained[1:], dtype=torch.bool)
            idx[r, at : at + n] = ids[:-1]
            targets[r, at : at + n] = torch.where(keep, ids[1:], IGNORE)
            positions[r, at : at + n] = torch.arange(n)
            doc_ids[r, at : at + n] = d
            at += n
    return {"idx": idx, "targets": targets, "positions": positions, "doc_ids": doc_ids}


class PackedLoader:
    """Resumable batches of packed rows; each epoch repacks in a new seeded order. Rank r takes rows r::W."""

    def __init__(self, examples, batch_size, seq_len, pad_id, seed=0, rank=0, world_size=1, device="cpu"):
        self.examples, self.B, self.T, self.pad_id = examples, batch_size, seq_len, pad_id
        self.seed, self.rank, self.world = seed, rank, world_size
        self.device = torch.device(device)
        self.epoch, self.cursor = 0, 0
        self._rows, self._rows_epoch = None, -1
        if len(self._epoch_rows()["idx"]) < batch_size * world_size:
            raise LmforgeError(
                f"the SFT data packs into {len(self._epoch_rows()['idx'])} rows of {seq_len} tokens, fewer than one "
                f"batch needs ({batch_size} x {world_size} processes); use more data or a smaller batch_size"
            )

    def _epoch_rows(self) -> dict[str, torch.Tensor]:
        if self._rows_epoch != self.epoch:
            self._rows = build_rows(self.examples, self.T, self.pad_id, self.seed + self.epoch)
            self._rows_epoch = self.epoch
        return self._rows

    def next_batch(self) -> dict:
        rows = self._epoch_rows()
        per_step = self.B * self.world
        if self.cursor + per_step > len(rows["idx"]):  # the incomplete tail of an epoch is skipped
            self.epoch, self.cursor = self.epoch + 1, 0
            rows = self._epoch_rows()
        sl = slice(self.cursor + self.rank * self.B, self.cursor + (self.rank + 1) * self.B)
        self.cursor += per_step
        batch = {k: v[sl].to(self.device) for k, v in rows.items()}
        batch["num_tokens"] = int((batch["doc_ids"] >= 0).sum())
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def all_rows_batches(examples, batch_size, seq_len, pad_id, device="cpu") -> list[dict]:
    """Every example packed once (fixed order): the validation set as a list of batches."""
    rows = build_rows(examples, seq_len, pad_id, seed=0)
    n = len(rows["idx"])
    return [{k: v[i : i + batch_size].to(device) for k, v in rows.items()} for i in range(0, n, batch_size)]
