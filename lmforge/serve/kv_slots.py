"""The serving engine's KV memory: `SlotCache`, fixed slots of keys and values allocated once, and `PrefixCache`, the
keys and values of recent prompts' starts, found again by their tokens.

    cache = SlotCache(model, slots=16, max_len=1024)   # (n_layer, slots, kv heads, max_len, head dim), k and v
    rows = cache.rows(n)                               # slots 0..n-1 as a decode step's KVCache
    prefixes = PrefixCache(max_tokens=4096)
    found = prefixes.lookup(prompt)                    # (k, v, n): the longest stored start, or None

Used by lmforge/serve/engine.py; tests in tests/test_serve_engine.py.
"""

from __future__ import annotations

import collections
import itertools

import torch

from lmforge.model.transformer import KVCache, Transformer


def flat_rows(slots: torch.Tensor, positions: torch.Tensor, kv_heads: int, max_len: int) -> torch.Tensor:
    """slots (n,), positions (n, T) -> where each (slot, kv head, position) lands in one layer's cache seen as
    (slots * kv_heads * max_len, head dim) rows, in (slot, head, position) order: what `write_kv` indexes."""
    heads = torch.arange(kv_heads, device=slots.device)[None, :, None]
    return ((slots[:, None, None] * kv_heads + heads) * max_len + positions[:, None, :]).reshape(-1)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, at: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:  # fmt: skip
    """Store k, v (n, kv heads, [T,] head dim) at the rows `at` (`flat_rows`) of a layer: one index_copy_ each, where
    an advanced-index assignment rebuilds its indices on every call."""
    D = k_cache.shape[-1]
    k_cache[layer].view(-1, D).index_copy_(0, at, k.reshape(-1, D))
    v_cache[layer].view(-1, D).index_copy_(0, at, v.reshape(-1, D))


class SlotCache:
    """`slots` rows of keys and values, `max_len` positions each, for every layer; row lengths kept apart."""

    def __init__(self, model: Transformer, slots: int, max_len: int):
        p = next(model.parameters())
        cfg = model.cfg
        shape = (cfg.n_layer, slots, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.v = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.lengths = [0] * slots  # plain ints: the engine reads and bumps them every step, a tensor's setitem costs

    def slot(self, i: int) -> KVCache:
        """A KVCache over slot i alone (views: what the model writes lands in the slot), for prefill."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.length = self.k[:, i : i + 1], self.v[:, i : i + 1], self.lengths[i]
        return view

    def rows(self, n: int, first: int = 0, T: int = 1) -> _Rows:
        return _Rows(self, n, first, T)

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's filled positions into slot dst (retiring dst)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class _Rows:
    """Slots first..first+n-1 as the model's forward sees them: each row writes its T new positions after its own
    length (a decode step: T = 1 on rows 0..n-1; a batched prefill: the chunks of several prompts, right-padded)."""

    def __init__(self, cache: SlotCache, n: int, first: int = 0, T: int = 1):
        self.cache, self.first, self.n = cache, first, n
        dev, (_, _, Hk, L, _) = cache.k.device, cache.k.shape
        starts = cache.lengths[first : first + n]
        self.length = torch.tensor(starts, device=dev)  # the model reads it as `start`, adds T after
        cols = self.length[:, None] + torch.arange(T, device=dev)  # (n, T)
        self._at = flat_rows(torch.arange(first, first + n, device=dev), cols, Hk, L)
        self._end = max(starts) + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (n, kv heads, T, head dim) -> the rows' keys and values so far (views of the cache)."""
        c, rows = self.cache, slice(self.first, self.first + self.n)
        write_kv(c.k, c.v, layer, self._at, k, v)
        return c.k[layer, rows, :, : self._end], c.v[layer, rows, :, : self._end]


class PrefixCache:
    """Keys and values of recent prompts' starts, by their tokens: a new prompt that begins the same way (the same
    system prompt, the same conversation one turn later, the same question again) copies them into its slot and
    prefills only the rest.

    Automatic prefix caching with fixed slots: a finished prefill is stored once and found under every multiple of
    `block` tokens of its prompt (1: any length, as SGLang's radix cache; vLLM's paged cache works in blocks of 16), by
    a chain of hashes (each block's hash covers every token before it), so the index holds one key per block rather
    than the prompt's every start; a hit is checked against the stored tokens, so a hash collision is a miss, never
    another prompt's keys. The least recently used prompts go first when the stored tokens pass `max_tokens`. Keys and
    values depend only on the tokens before them, so a copy is what the prefill would have computed (up to float
    rounding of a different chunking, as any chunked prefill).
    """

    def __init__(self, max_tokens: int, block: int = 1):
        self.max_tokens, self.block = max_tokens, block
        # entry id -> (keys, values, its tokens, its chain hashes)
        self.entries: collections.OrderedDict[int, tuple[torch.Tensor, torch.Tensor, tuple, list[int]]] = (
            collections.OrderedDict())  # fmt: skip
        self.index: dict[int, tuple[int, int]] = {}  # chain hash of a prompt start -> (entry, the start's length)
        self.tokens = 0
        self.ids = itertools.count()
        self.hits = self.hit_tokens = 0

    def _chain(self, prompt: list[int]) -> list[int]:
        """Hashes of prompt[:block], prompt[:2 block], ... up to the longest start that leaves a token to prefill."""
        h, out, b = 0, [], self.block
        for m in range(b, (len(prompt) - 1) // b * b + 1, b):
            h = hash((h, *prompt[m - b : m]))
            out.append(h)
        return out

    def lookup(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(k, v, n) for the longest stored start of `prompt`, leaving at least one token to prefill."""
        chain = self._chain(prompt)
        for i in range(len(chain) - 1, -1, -1):
            found = self.index.get(chain[i])
            if found is None:
                continue
            eid, n = found
            k, v, tokens, _ = self.entries[eid]
            if tokens[:n] == tuple(prompt[:n]):
                self.entries.move_to_end(eid)
                self.hits, self.hit_tokens = self.hits + 1, self.hit_tokens + n
                return k[:, :, :n], v[:, :, :n], n
        return None

    def store(self, prompt: list[int], cache: SlotCache, slot: int) -> None:
        chain = self._chain(prompt)
        n = len(chain) * self.block
        if n == 0 or n > self.max_tokens:
            return
        found = self.index.get(chain[-1])
        if found is not None and found[1] == n and self.entries[found[0]][2][:n] == tuple(prompt[:n]):
            return  # stored already
        while self.tokens + n > self.max_tokens:
            old, (k, _, _, hashes) = self.entries.popitem(last=False)
            self.tokens -= k.shape[2]
            for h in hashes:
                if self.index.get(h, (None,))[0] == old:  # not since taken over by a later prompt's entry
                    del self.index[h]
        eid = next(self.ids)
        self.entries[eid] = (cache.k[:, slot, :, :n].clone(), cache.v[:, slot, :, :n].clone(), tuple(prompt[:n]), chain)
        for i, h in enumerate(chain):
            self.index[h] = (eid, (i + 1) * self.block)
        self.tokens += n
