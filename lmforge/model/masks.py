"""Attention masks for the decoder (lmforge/model/transformer.py): causal with a cache, padding, packed documents,
GLM's bidirectional prefix, an explicit (B, T, T) mask, and ALiBi's distance bias. Pure functions.

    mask = attention_mask(T, start, device, key_mask=..., alibi_slopes=alibi_slopes(n_head))
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # or is_causal=True where it returns None
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al. 2022), including their rule for non-power-of-2 head counts."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_2(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = power_of_2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(power_of_2(closest) + extra)


def attention_mask(T, start, device, *, key_mask=None, doc_ids=None, prefix_len=None, attn_mask=None, positions=None,
                   alibi_slopes=None):  # fmt: skip
    """The attention mask for T new queries, or None when plain causal attention (`is_causal=True`) is exact.

    With a cache, query i sits at absolute position start+i and sees keys 0..start+i.
    `start` is the cache length: an int, or a (B,) tensor when each row holds its own length
    (the serving engine's slots, lmforge/serve/engine.py: keys past a row's own length are
    hidden). `key_mask` (B, start+T) marks real tokens (False for left padding). `doc_ids`
    (B, T) makes the mask block-diagonal: packed sequences attend only within their own
    document. `prefix_len` (B,): GLM's part A, seen by every token, seeing only itself. `attn_mask`
    (B, T, T), no cache: which keys each query sees, given whole (then ALiBi reads distances off `positions`).
    `alibi_slopes` (H,): ALiBi adds -slope * distance to the scores (a float mask, -inf where not allowed).
    """
    per_row = isinstance(start, torch.Tensor)
    plain = key_mask is None and doc_ids is None and prefix_len is None and attn_mask is None and alibi_slopes is None
    if not per_row and plain and (start == 0 or T == 1):
        return None
    if attn_mask is not None:
        allowed = attn_mask.bool()[:, None]  # (B, 1, T, T)
        where = positions if positions is not None else torch.arange(T, device=device)[None, :]
        q_pos, k_pos = where[:, :, None], where[:, None, :]
    else:
        first = start.view(-1, 1, 1) if per_row else torch.tensor(start, device=device).view(1, 1, 1)
        q_pos = first + torch.arange(T, device=device)[None, :, None]  # (B or 1, T, 1)
        k_pos = torch.arange((int(start.max()) if per_row else start) + T, device=device)[None, None, :]
        allowed = (k_pos <= q_pos)[:, None]  # (B or 1, 1, T, S)
    if prefix_len is not None:  # GLM: every token sees the whole prefix (part A), which sees only itself
        allowed = allowed | (k_pos < prefix_len.view(-1, 1, 1))[:, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if alibi_slopes is None:
        return allowed
    bias = -alibi_slopes[None, :, None, None] * (q_pos - k_pos)[:, None].clamp(min=0)  # (B or 1, H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))
