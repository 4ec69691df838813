"""Turning next-token logits into a token: temperature, top-k, top-p, repetition penalty.

Pure functions on logits of shape (batch, vocab); the engine (`lmforge.serve.generate`)
chains them in the order Hugging Face's `generate` does: repetition penalty, temperature,
top-k, top-p, then a draw (or argmax when temperature is 0).

    python -m pytest tests/test_generate.py -k sampling
"""

from __future__ import annotations

import torch

from lmforge.model import cpu_kernels


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize tokens already in the sequence (CTRL, Keskar et al. 2019, as Hugging Face applies it).

    seen (batch, vocab) bool marks tokens present in the prompt or the output. A seen token's
    positive logit is divided by `penalty`, a negative one multiplied, so it always becomes
    less likely when penalty > 1. (CTRL divides every logit; HF's sign rule is what users expect.)
    """
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0); 1 leaves logits unchanged. Temperature 0 (greedy) is `pick`'s job."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept, as in HF); the rest become -inf."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose mass is >= p.

    A token is dropped when the tokens ranked above it already hold mass >= p; the most
    likely token is always kept.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row (batch,): argmax when temperature is 0, else a draw after temperature/top-k/top-p."""
    if temperature == 0:
        return cpu_kernels.greedy(logits)
    logits = apply_top_p(apply_top_k(apply_temperature(logits.float(), temperature), top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
