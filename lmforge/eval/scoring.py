"""Log-likelihoods of continuations, batched: what `lmforge eval`'s multiple choice and the harness adapter's
`loglikelihood` run (lmforge/eval/mc.py, lmforge/eval/harness.py).

    from lmforge.eval.scoring import score_pairs
    scores = score_pairs(model, [(context_ids, continuation_ids), ...])  # [(log P(cont | ctx), is it greedy), ...]

Pairs with the same context (the choices of one question) form a group whose context runs once: the context is
followed by every continuation but its last token, each continuation's tokens at the positions that follow the
context (as if it were alone) and attending to the context and to their own earlier tokens only, so every hidden
state is the one of context + that continuation run alone (tests/test_eval.py holds it to scoring each pair in
full). Only the scored positions go through the output head. A batch of groups runs one of two ways:
- flat, on a CPU in float32 with lmforge's C kernels (no ALiBi): every token of the batch in one sequence, no
  padding, through FusedDecoder's layers (q/k/v and the MLP's input products each one matrix product), each token's
  attention reading only the two spans of keys it sees (cpu_kernels.span_attention);
- rows, anywhere else: groups packed into rows of PACK_TOKENS, right-padded, a (T, T) attention mask per row.
On SmolLM2-135M the flat way scored the built-in sets 1.23x faster than the rows (a dense mask multiplies every key
of a 256-token row; BENCHMARKS.md, "lm-evaluation-harness").
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch

from lmforge.model import cpu_kernels

PACK_TOKENS = 256  # the rows way fills rows with groups up to this (attention runs over whole rows: keep them short)
SPLIT_TOKENS = 1024  # a group's continuations past this many tokens are split over pieces (each with the context)
# A piece longer than this runs the rows way even where the flat way applies: the span kernel reads each key with a
# dot product, ~1/4 the speed per key of SDPA's blocked products, so past ~512 tokens the keys it skips stop paying for
# it (one SmolLM2 question with a 512 / 1,024 / 2,048-token context: flat 1.02x / 1.22x / 2.2x the rows' time).
FLAT_TOKENS = 512
HEAD_ROWS = 1024  # scored positions per output-head product: the (rows x vocabulary) log-probabilities at once
# Tokens (rows x longest row) of one scoring forward. On a CPU the activations of 2,048 tokens stay in cache between the
# norms, RoPE, SwiGLU and attention: 600 demo-model items scored 1.30x faster than with 8,192, SmolLM2's 1.15x
# (benchmarks/score_batch.py, BENCHMARKS.md); an accelerator wants the larger batches.
CPU_BATCH_TOKENS = 2048
BATCH_TOKENS = 8192


def _ids(values: list[int], device=None) -> torch.Tensor:
    """An int64 tensor of a list of Python ints: through numpy, ~8x torch.tensor's speed on the ~300k-element lists of
    one batch's tokens, positions and spans."""
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 for the log-softmax (bf16/fp16 models), a float64 model's kept in float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def score_pair(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """(log P(cont | ctx), whether cont is the greedy continuation), from one forward pass over the last
    max_seq_len tokens of ctx + cont (the harness's truncation: the oldest context goes first)."""
    device = next(model.parameters()).device
    ids = (ctx + cont)[-(model.cfg.max_seq_len + 1) :][:-1]
    logits, _ = model(torch.tensor([ids], device=device))
    return _sum_logp(torch.log_softmax(_at_least_fp32(logits[0, -len(cont) :]), -1), cont)


def _sum_logp(logp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(sum of log P of `cont`'s tokens, whether each is the argmax) from their rows of log-probabilities."""
    target = torch.tensor(cont, device=logp.device)
    ll = float(logp.gather(1, target[:, None]).double().sum())  # a float32 sum of ~1,000 nats is off by 1e-4
    return ll, bool((cpu_kernels.greedy(logp) == target).all())


def _flat_decoder(model):
    """The FusedDecoder the flat way runs on, or None where it does not apply (not a CPU float32 model of ours with
    the C kernels built, or ALiBi, whose biases the span kernel does not add)."""
    from lmforge.serve.generate import FusedDecoder

    if not FusedDecoder.supports(model) or model.cfg.pos_encoding == "alibi":
        return None
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or cpu_kernels.loaded() is None:
        return None
    return FusedDecoder(model, 0)  # 0: many rows a product, the weights as stored


@torch.no_grad()
def score_groups(model, groups: list[tuple[list[int], list[list[int]]]], budget: int | None = None,
                 done=None) -> list[list[tuple[float, bool]]]:  # fmt: skip
    """score_pair for every continuation of every (context, continuations) group, batched: each context runs
    once for all its continuations, and many groups run in one forward of up to `budget` tokens (None:
    CPU_BATCH_TOKENS on a CPU, BATCH_TOKENS elsewhere; the rows way counts rows x longest row).

    A group whose continuations add up to more than SPLIT_TOKENS (many or long choices) is split into pieces, each
    with its own copy of the context; a long context alone does not split a group (its choices share it).
    A continuation that does not fit max_seq_len after its context gets score_pair's truncation (the harness's: the
    oldest context goes first, max_seq_len tokens run) as a piece of its own whose context is the part of the
    context that is kept, so long few-shot prompts are batched too; one longer than max_seq_len runs alone
    (score_pair). `done(n)` is called with the number of continuations scored.
    """
    max_len = model.cfg.max_seq_len
    budget = budget or (CPU_BATCH_TOKENS if next(model.parameters()).device.type == "cpu" else BATCH_TOKENS)
    out: list[list] = [[None] * len(conts) for _, conts in groups]
    # (tokens, group, the continuations packed with the context, the context: the group's, or its kept part)
    pieces: list[tuple[int, int, list[int], list[int]]] = []
    for g, (ctx, conts) in enumerate(groups):
        piece, length = [], len(ctx)  # length: the piece's tokens, its context's included
        for k, c in enumerate(conts):
            if not ctx or len(c) > max_len:  # nothing to condition on, or no context kept at all
                out[g][k] = score_pair(model, ctx, c)
                if done is not None:
                    done(1)
            elif len(ctx) + len(c) - 1 > max_len:  # what score_pair runs: the last max_len tokens of ctx + c[:-1]
                kept = ctx[len(ctx) + len(c) - 1 - max_len :]
                pieces.append((max_len, g, [k], kept))
            else:
                if piece and length - len(ctx) + len(c) - 1 > SPLIT_TOKENS:
                    pieces.append((length, g, piece, ctx))
                    piece, length = [], len(ctx)
                piece.append(k)
                length += len(c) - 1
        if piece:
            pieces.append((length, g, piece, ctx))
    fused = _flat_decoder(model)
    flat = [p for p in pieces if fused is not None and p[0] <= FLAT_TOKENS]
    rest = [p for p in pieces if fused is None or p[0] > FLAT_TOKENS]
    batches = [(b, True) for b in _flat_batches(flat, budget)] + [(b, False) for b in _row_batches(rest, budget)]
    for batch, is_flat in batches:
        rows = [[(ctx, [groups[g][1][k] for k in ks]) for _, g, ks, ctx in row] for row in batch]
        scored = [_score_flat(fused, rows[0])] if is_flat else _score_packed(model, rows)
        for row, row_scores in zip(batch, scored, strict=True):
            for (_, g, ks, _), scores in zip(row, row_scores, strict=True):
                for k, score in zip(ks, scores, strict=True):
                    out[g][k] = score
        if done is not None:
            done(sum(len(piece[2]) for row in batch for piece in row))
    return out


def _flat_batches(pieces: list[tuple], budget: int) -> list[list[list[tuple]]]:
    """Pieces in order, as many to a batch as fit `budget` tokens (a longer piece alone); each batch one row."""
    batches: list[list[tuple]] = []
    size = budget
    for piece in pieces:
        if size + piece[0] > budget:
            batches.append([])
            size = 0
        batches[-1].append(piece)
        size += piece[0]
    return [[batch] for batch in batches]


def _row_batches(pieces: list[tuple], budget: int) -> list[list[list[tuple]]]:
    """Pieces packed into rows of PACK_TOKENS (pack_rows), rows batched while rows x longest row fits `budget`."""
    rows = pack_rows(pieces, PACK_TOKENS)
    batches, i = [], 0
    while i < len(rows):
        j = i + 1  # rows sorted by length: the last of a batch is its longest
        while j < len(rows) and (j + 1 - i) * sum(p[0] for p in rows[j]) <= budget:
            j += 1
        batches.append(rows[i:j])
        i = j
    return batches


def pack_rows(pieces: list[tuple], capacity: int) -> list[list[tuple]]:
    """Pieces (length, ...) packed into rows of at most `capacity` tokens, best fit (the fullest row it fits),
    longest first; a piece longer than capacity gets a row of its own. Rows come sorted by their length."""
    rows: list[list[tuple]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for piece in sorted(pieces, key=lambda p: -p[0]):
        at = bisect.bisect_left(free, (piece[0], -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(piece)
            bisect.insort(free, (room - piece[0], r))
        else:
            rows.append([piece])
            if piece[0] < capacity:
                bisect.insort(free, (capacity - piece[0], len(rows) - 1))
    return sorted(rows, key=lambda row: sum(p[0] for p in row))


def score_pairs(model, pairs: list[tuple[list[int], list[int]]], budget: int | None = None,
                done=None) -> list[tuple[float, bool]]:  # fmt: skip
    """score_pair for each (context, continuation), through score_groups: pairs with the same context tokens
    (the choices of one question) share one run of it. `done(n)`: pairs finished, for a progress bar."""
    by_ctx: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        by_ctx.setdefault(tuple(ctx), []).append(i)
    groups = [(list(ctx), [pairs[i][1] for i in idx]) for ctx, idx in by_ctx.items()]
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for idx, scores in zip(by_ctx.values(), score_groups(model, groups, budget, done), strict=True):
        for i, score in zip(idx, scores, strict=True):
            out[i] = score
    return out


class _Layout:
    """Where the tokens of packed groups go: appended one group at a time, each continuation's tokens at the
    positions after its context's; per scored token, the slot whose hidden state predicts it."""

    def __init__(self):
        self.slots: list[int] = []  # per scored token: the slot (index into the row) of the state that predicts it
        self.targets: list[int] = []  # the token scored
        self.owners: list[int] = []  # which continuation (in order over the batch) it belongs to
        self.n_conts = 0

    def add(self, start: int, ctx: list[int], conts: list[list[int]]) -> list[tuple[int, int, list[int]]]:
        """The group laid out from slot `start` as [context | c1[:-1] | c2[:-1] | ...]: records its scored tokens
        and returns each continuation's (first slot, tokens run); its first position is len(ctx)."""
        P, at, out = len(ctx), start + len(ctx), []
        for c in conts:
            n = len(c) - 1
            self.slots += [start + P - 1, *range(at, at + n)]
            self.targets += c
            self.owners += [self.n_conts] * (n + 1)
            self.n_conts += 1
            out.append((at, c[:-1]))
            at += n
        return out


def _score_flat(fused, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
    """score_groups' flat way over one batch: every group's tokens in one sequence (no padding), each token's
    attention over the spans of keys it sees: a context token its context's tokens up to itself, a continuation's
    token the whole context and its own continuation's tokens up to itself (not the other continuations')."""
    tokens, positions, spans = [], [], []  # spans per token: (start, length) twice, flat (a flat list converts faster)
    layout = _Layout()
    for ctx, conts in groups:
        g0, P = len(tokens), len(ctx)
        tokens += ctx
        positions += range(P)
        for i in range(P):
            spans += (g0, i + 1, 0, 0)
        for c0, run in layout.add(g0, ctx, conts):
            tokens += run
            positions += range(P, P + len(run))
            for j in range(len(run)):
                spans += (g0, P, c0, j + 1)
    span_t = _ids(spans).view(-1, 4)
    x, rope = fused._embed(_ids(tokens), _ids(positions))

    def attend(layer, q, k, v):
        return cpu_kernels.span_attention(q, k, v, span_t)

    x = fused._layers(x, rope, attend)
    hidden = fused.norm(x[_ids(layout.slots)])
    return _continuation_scores(fused.head, hidden, layout, [conts for _, conts in groups])


def _score_packed(model, rows) -> list[list[list[tuple[float, bool]]]]:
    """score_groups' rows way over one batch: each row a list of (context, continuations) groups, each group laid
    out as [context | c1[:-1] | c2[:-1] | ...], rows right-padded, an attention mask per row that lets each token see
    what it would see run alone (its context, its own continuation's earlier tokens); padding sees only padding."""
    device = next(model.parameters()).device
    T = max(sum(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in row) for row in rows)
    # per row and slot: token, position, segment (a context or one continuation) and the segment of its context
    tokens, positions, segment, context = [], [], [], []
    layout, at = _Layout(), []  # at: per scored token, its row
    for r, row in enumerate(rows):
        tok, pos, seg, ctx_seg = [], [], [], []
        for ctx, conts in row:
            P, s0, n0 = len(ctx), len(seg), len(layout.slots)
            tok += ctx
            pos += range(P)
            seg += [s0] * P
            ctx_seg += [s0] * P
            for k, (_, run) in enumerate(layout.add(len(tok) - P, ctx, conts), 1):
                tok += run
                pos += range(P, P + len(run))
                seg += [s0 + k] * len(run)
                ctx_seg += [s0] * len(run)
            at += [r] * (len(layout.slots) - n0)
        pad = T - len(tok)  # padding comes after every real token and sees only padding
        tokens.append(tok + [0] * pad)
        positions.append(pos + [0] * pad)
        segment.append(seg + [-1] * pad)
        context.append(ctx_seg + [-1] * pad)
    seg_t, ctx_t = torch.tensor(segment, device=device), torch.tensor(context, device=device)
    slot = torch.arange(T, device=device)
    mask = (slot[None, None, :] <= slot[None, :, None]) & (
        (seg_t[:, None, :] == seg_t[:, :, None]) | (seg_t[:, None, :] == ctx_t[:, :, None])
    )  # (rows, query, key)
    idx, pos_t = torch.tensor(tokens, device=device), torch.tensor(positions, device=device)
    hidden, _ = model(idx, positions=pos_t, attn_mask=mask, return_hidden=True)
    hidden = hidden[torch.tensor(at, device=device), torch.tensor(layout.slots, device=device)]
    flat = [conts for row in rows for _, conts in row]
    scores = iter(_continuation_scores(model.lm_head, hidden, layout, flat))
    return [[next(scores) for _ in row] for row in rows]


def _continuation_scores(head: Callable, hidden: torch.Tensor, layout: _Layout,
                         conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:  # fmt: skip
    """Per group, per continuation: (the sum of its tokens' log-probabilities, whether each is the argmax), from the
    final hidden states of the scored tokens (in layout order) through `head` in blocks of HEAD_ROWS."""
    target = _ids(layout.targets, hidden.device)
    token_ll, token_greedy = [], []
    for s in range(0, len(target), HEAD_ROWS):
        logits, t = _at_least_fp32(head(hidden[s : s + HEAD_ROWS])), target[s : s + HEAD_ROWS]
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_kernels.loaded() is not None:
            ll, greedy = cpu_kernels.target_logprob(logits, t)  # one C pass, no (rows x vocabulary) log-probabilities
        else:
            logp = torch.log_softmax(logits, -1)
            ll, greedy = logp.gather(1, t[:, None])[:, 0], cpu_kernels.greedy(logp) == t
        token_ll.append(ll.double())
        token_greedy.append(greedy)
    owner = _ids(layout.owners, hidden.device)
    # a float32 sum of ~1,000 nats is off by 1e-4: sum in float64
    ll = torch.zeros(layout.n_conts, dtype=torch.float64, device=hidden.device)
    ll = ll.index_add_(0, owner, torch.cat(token_ll)).tolist()
    misses = torch.zeros(layout.n_conts, dtype=torch.long, device=hidden.device)
    misses = misses.index_add_(0, owner, (~torch.cat(token_greedy)).long()).tolist()
    out, n = [], 0
    for group in conts:
        out.append([(ll[n + k], misses[n + k] == 0) for k in range(len(group))])
        n += len(group)
    return out
