"""Validation loss, perplexity and bits per byte over a fixed set of held-out batches.

Bits per byte makes models with different tokenizers comparable:
bpb = (mean loss in nats per token) / ln 2 * (tokens / bytes) of the split,
with the split's token and UTF-8 byte counts from the shard index.
"""

from __future__ import annotations

import math

import torch


def bits_per_byte(loss_nats: float, num_tokens: int, num_bytes: int) -> float:
    """Mean per-token loss in nats -> bits per UTF-8 byte of the text."""
    return loss_nats / math.log(2) * num_tokens / max(1, num_bytes)


@torch.no_grad()
def evaluate_loss(model, batches, autocast) -> float:
    """Mean next-token loss (nats) over the targets of `batches`: (x, y) pairs or dicts of forward
    arguments (SFT); targets of -100 (prompt tokens, padding) are not counted."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        kwargs = (
            {k: v for k, v in batch.items() if k != "num_tokens"}
            if isinstance(batch, dict)
            else dict(zip(("idx", "targets"), batch, strict=True))
        )
        with autocast:
            _, loss = model(**kwargs, loss_reduction="sum")
        total += float(loss)
        count += int((kwargs["targets"] != -100).sum())
    model.train(was_training)
    return total / max(1, count)
