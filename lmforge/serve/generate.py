"""The generation engine: batched prompts, a preallocated KV cache, sampling, stop tokens, streaming.

    from lmforge.serve.generate import generate
    new_tokens = generate(model, [[1, 2, 3], [4, 5]], 50, temperature=0)

Prompts of different lengths are left-padded: each row gets position ids counted from its
first real token and a key mask hiding its padding, so a row's tokens match what it would get
alone. One prefill forward fills the cache with all prompts; then one forward per new token.
Length policy: if the longest prompt plus `max_new_tokens` exceeds `model.cfg.max_seq_len`,
prompts are truncated from the left (the oldest tokens go), keeping the last
`max_seq_len - max_new_tokens`; `max_new_tokens >= max_seq_len` is an LmforgeError.
The CLI is `lmforge generate` (lmforge/serve/generate_cmd.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.model.transformer import KVCache
from lmforge.serve.sampling import apply_repetition_penalty, pick


def _check(model, prompts, max_new_tokens) -> list[list[int]]:
    """Validate the request; return the prompts after the left-truncation policy."""
    max_len = model.cfg.max_seq_len
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= max_len:
        raise LmforgeError(f"max_new_tokens ({max_new_tokens}) must be below the model's max_seq_len ({max_len})")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token (start from <|endoftext|> for unconditional text)")
    keep = max_len - max_new_tokens
    return [list(p[-keep:]) for p in prompts]


def _sampler(temperature, top_k, top_p, repetition_penalty, generator):
    """Return (logits, seen) -> token ids: the whole per-step sampling recipe in one closure."""

    def sample(logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        return pick(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    return sample


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    include_stop: bool = False,
    seed: int | None = None,
    pad_id: int = 0,
    stream: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (not the prompt), up to `max_new_tokens` per row.

    temperature 0 is greedy. A row ends at its first token in `stop_ids`; that token is left
    out of the output (and not streamed) unless `include_stop`. `seed` makes sampling
    repeatable (a private torch.Generator; the global RNG is untouched). `stream(row, token_id)`
    is called for each new token as it is chosen. `pad_id` only fills padding, which the
    attention mask hides, so any valid id works.
    """
    model.eval()
    prompts = _check(model, prompts, max_new_tokens)
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    sample = _sampler(temperature, top_k, top_p, repetition_penalty, generator)
    seen = None
    if repetition_penalty != 1.0:  # tokens in the prompt or output so far (HF counts the prompt too)
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
        # Stop tokens are never penalized: a chat prompt holds a turn-end token for every earlier turn,
        # and penalizing it teaches the model to never stop (HF penalizes it; a known chat pitfall).
        if stop_ids:
            seen[:, torch.tensor(list(stop_ids), device=device)] = False
    dtype = next(model.parameters()).dtype
    # The last new token is never fed back, so the cache needs P + max_new_tokens - 1 slots.
    cache = KVCache(model.cfg, B, P + max_new_tokens - 1, device=device, dtype=dtype)

    # Equal lengths need no positions or mask: the model then uses plain causal attention and sliced tables.
    padded = bool((lengths != P).any())
    if padded:
        real = torch.arange(P, device=device)[None, :] >= (P - lengths)[:, None]
        key_mask = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
        key_mask[:, :P] = real
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        logits, _ = model(tokens, cache=cache, positions=positions, key_mask=key_mask[:, :P], last_only=True)
        next_pos = lengths[:, None]
    else:
        logits, _ = model(tokens, cache=cache, last_only=True)
    logits = logits[:, -1]

    stop_set = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # the same as `done`, as a tensor
    for step in range(max_new_tokens):
        tok = sample(logits, seen)
        for row, t in enumerate(tok.tolist()):
            if done[row]:
                continue
            if t in stop_set:
                done[row] = True
                finished[row] = True
                if not include_stop:
                    continue
            out[row].append(t)
            if stream is not None:
                stream(row, t)
        if step == max_new_tokens - 1 or all(done):
            break
        if any(done):
            tok = tok.masked_fill(finished, pad_id)  # finished rows keep feeding padding
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if padded:
            L = P + step + 1
            logits, _ = model(tok[:, None], cache=cache, positions=next_pos + step, key_mask=key_mask[:, :L])
        else:
            logits, _ = model(tok[:, None], cache=cache)
        logits = logits[:, -1]
    return out


@torch.inference_mode()
def generate_no_cache(model, prompt: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence each step: the slow reference the tests use."""
    model.eval()
    device = next(model.parameters()).device
    seq = list(prompt)
    new = []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq], device=device))
        t = int(logits[0, -1].argmax())
        if t in stop_ids:
            break
        seq.append(t)
        new.append(t)
    return new
