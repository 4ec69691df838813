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


@torch.no_grad()
def text_loss(model, tokenizer, texts, eot_id: int | None = None, max_tokens: int = 0) -> dict:
    """Mean next-token loss, perplexity and bits per byte of `texts` (an iterable of strings).

    The documents are encoded, joined with the end-of-text id, and read in windows of max_seq_len + 1
    tokens that overlap by one, so every token but the first is predicted once (from at most max_seq_len
    tokens before it). `max_tokens` > 0 stops after that many tokens.
    """
    ids, nbytes = [], 0
    for text in texts:
        ids += tokenizer.encode(text).ids + ([eot_id] if eot_id is not None else [])
        nbytes += len(text.encode("utf-8"))
        if max_tokens and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            nbytes = len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))  # what is scored
            break
    if len(ids) < 2:
        raise ValueError("fewer than 2 tokens of text")
    T = model.cfg.max_seq_len
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, T):
        window = torch.tensor(ids[start : start + T + 1], device=device)
        _, loss = model(window[None, :-1], window[None, 1:], loss_reduction="sum")
        total += float(loss)
        count += len(window) - 1
    model.train(was)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": bits_per_byte(loss, count, nbytes),
            "tokens": count, "bytes": nbytes}  # fmt: skip
