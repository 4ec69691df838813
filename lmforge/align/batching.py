"""Preference pairs as tensors: chosen and rejected rows, loss targets on the response only.

    encoded, report = encode_pairs(fmt, pairs, seq_len=256)
    loader = PairLoader(encoded, batch_size=8, pad_id=0, seed=0)
    batch = loader.next_batch()   # idx, targets (2B, T): chosen rows first, then rejected; last (2B,)

Each side is the prompt plus one assistant answer rendered with the model's chat template;
targets are the next tokens on the final answer (and its turn-end token), -100 elsewhere, so
the sum of target log-probabilities is log pi(answer | prompt). `last` indexes each row's final
token, where a reward head reads its score. A pair longer than `seq_len` on either side is
dropped and counted (`too_long`): cutting the prompt would change what is being judged.
"""

from __future__ import annotations

import random

import torch

from lmforge.errors import LmforgeError

IGNORE = -100


def encode_side(fmt, prompt: list[dict], answer: str) -> tuple[list[int], list[bool]]:
    return fmt.encode_with_mask([*prompt, {"role": "assistant", "content": answer}], last_only=True)


def encode_pairs(fmt, pairs: list[dict], seq_len: int) -> tuple[list[tuple], dict]:
    encoded, too_long = [], 0
    for pair in pairs:
        c = encode_side(fmt, pair["prompt"], pair["chosen"])
        r = encode_side(fmt, pair["prompt"], pair["rejected"])
        if max(len(c[0]), len(r[0])) > seq_len + 1:
            too_long += 1
            continue
        encoded.append((c, r))
    if not encoded and pairs:
        raise LmforgeError(f"every one of {len(pairs)} pairs is longer than seq_len={seq_len} (+1)")
    return encoded, {"pairs": len(pairs), "encoded": len(encoded), "too_long": too_long}


def collate(sides: list[tuple[list[int], list[bool]]], pad_id: int, device="cpu") -> dict:
    """Right-padded rows: idx, targets (-100 off the answer), last (index of each row's final token)."""
    T = max(len(ids) for ids, _ in sides) - 1
    idx = torch.full((len(sides), T), pad_id, dtype=torch.long)
    targets = torch.full((len(sides), T), IGNORE, dtype=torch.long)
    last = torch.zeros(len(sides), dtype=torch.long)
    for i, (ids, trained) in enumerate(sides):
        n = len(ids) - 1
        t = torch.tensor(ids)
        idx[i, :n] = t[:-1]
        targets[i, :n] = torch.where(torch.tensor(trained[1:]), t[1:], IGNORE)
        last[i] = n - 1
    num_tokens = sum(len(ids) - 1 for ids, _ in sides)
    return {"idx": idx.to(device), "targets": targets.to(device), "last": last.to(device), "num_tokens": num_tokens}


def collate_pairs(pairs: list[tuple], pad_id: int, device="cpu") -> dict:
    return collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)


class PairLoader:
    """Resumable batches of pairs, reshuffled each epoch by seed; rank r of W takes every W-th batch."""

    def __init__(self, pairs, batch_size, pad_id, seed=0, rank=0, world_size=1, device="cpu"):
        if len(pairs) < batch_size * world_size:
            raise LmforgeError(f"{len(pairs)} training pairs, fewer than one batch ({batch_size} x {world_size})")
        self.pairs, self.B, self.pad_id, self.seed = pairs, batch_size, pad_id, seed
        self.rank, self.world, self.device = rank, world_size, device
        self.epoch, self.cursor = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> dict:
        per_step = self.B * self.world
        if self.cursor + per_step > len(self.pairs):
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._order()
        start = self.cursor + self.rank * self.B
        self.cursor += per_step
        return collate_pairs([self.pairs[i] for i in order[start : start + self.B]], self.pad_id, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def pair_batches(pairs: list[tuple], batch_size: int, pad_id: int, device="cpu") -> list[dict]:
    """All pairs once, in order: the held-out set."""
    return [collate_pairs(pairs[i : i + batch_size], pad_id, device) for i in range(0, len(pairs), batch_size)]


def pair_data(cfg, run) -> tuple[object, list, list, str, dict]:
    """Read, split (by prompt) and encode the run's preference pairs; writes nothing.

    Returns (chat format, train pairs, held-out pairs, a one-line summary, the data report) for reward and dpo.
    """
    from lmforge.align.prefs import load_pairs, split_pairs
    from lmforge.chat.template import ChatFormat

    fmt = ChatFormat(run.tokenizer_dir)
    ps = load_pairs(cfg.data)
    train_pairs, val_pairs = split_pairs(ps.pairs, cfg.val_fraction, cfg.seed)
    train, train_report = encode_pairs(fmt, train_pairs, cfg.seq_len)
    val, val_report = encode_pairs(fmt, val_pairs, cfg.seq_len)
    report = {"source": ps.source, "skipped": ps.skipped, "train": train_report, "val": val_report}
    summary = (f"{len(train)} train / {len(val)} held-out pairs ({sum(ps.skipped.values())} skipped: {ps.skipped}, "
               f"{train_report['too_long'] + val_report['too_long']} longer than seq_len)")  # fmt: skip
    return fmt, train, val, summary, report
