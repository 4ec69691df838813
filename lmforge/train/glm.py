"""GLM's autoregressive blank infilling: `lmforge pretrain --objective glm` on a decoder.

    lmforge pretrain --preset tiny --objective glm --data shards/ --out runs/glm --max-steps 600

GLM (Du et al. 2022) trains one decoder both to understand and to generate: from each window of the token stream
spans are blanked out (15% of the tokens, spans of mean length 3: the span sampler of lmforge/train/span.py; GLM
draws lengths from Poisson(3), a deviation that keeps both objectives on one sampler). Part A is the window with
each span replaced by one [MASK]; part B is the spans in a random order, each behind a [START] token, predicted
token by token and closed by the end-of-text token:

    A: x1 [MASK] x4 [MASK]          B: [S] x5 x6  [S] x2 x3          targets: x5 x6 [E] x2 x3 [E]
    position:   1 2 3 4                 4  4  4   2  2  2
    block pos:  0 0 0 0                 1  2  3   1  2  3

Part A attends to itself both ways; part B attends to all of A and causally to itself (`prefix_len`). Each
token's position is its place in A (a span's tokens all take their [MASK]'s place) and its block position its
place inside the span (`model.block_positions`: a second learned table; GLM's 2D positional encoding). [MASK]
and [START] are the model's last two vocabulary rows, above every token of the tokenizer. The loss is part B's.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.loader import LoaderView
from lmforge.model.losses import IGNORE_INDEX
from lmforge.train.span import noise_mask, span_counts

N_GLM_TOKENS = 2  # [MASK] and [START]


def glm_window(seq_len: int, density: float = 0.15, mean_span: float = 3.0) -> int:
    """The longest window whose row fits seq_len: a row is the window plus two tokens per span (its [MASK] in part
    A, its [START] in part B)."""
    length = seq_len
    while length > 2 and length + 2 * span_counts(length, density, mean_span)[1] > seq_len:
        length -= 1
    return length


def infill_row(tokens: np.ndarray, mask: np.ndarray, mask_id: int, start_id: int, end_id: int,
               rng: np.random.Generator) -> dict[str, list[int]]:  # fmt: skip
    """One GLM row from a window and its blank mask: idx, targets, positions, block positions and part A's length."""
    part_a, spans, where = [], [], []
    i = 0
    while i < len(tokens):
        if not mask[i]:
            part_a.append(int(tokens[i]))
            i += 1
            continue
        where.append(len(part_a))
        part_a.append(mask_id)
        span = []
        while i < len(tokens) and mask[i]:
            span.append(int(tokens[i]))
            i += 1
        spans.append(span)
    idx, targets = list(part_a), [IGNORE_INDEX] * len(part_a)
    positions, blocks = list(range(len(part_a))), [0] * len(part_a)
    for s in rng.permutation(len(spans)):
        span = spans[s]
        idx += [start_id, *span]
        targets += [*span, end_id]
        positions += [where[s]] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    return {
        "idx": idx,
        "targets": targets,
        "positions": positions,
        "block_positions": blocks,
        "prefix_len": len(part_a),
    }


class GlmBatches(LoaderView):
    """Blank-infilling batches from a TokenLoader of `glm_window(seq_len)` tokens: `next_batch()` -> the forward's
    arguments (idx, targets, positions, block_positions, prefix_len) and num_tokens; state is the loader's."""

    def __init__(self, loader, vocab_rows: int, end_id: int, *, density=0.15, mean_span=3.0, seed=0):
        self.loader, self.end_id = loader, end_id
        self.mask_id, self.start_id = vocab_rows - 1, vocab_rows - 2
        self.density, self.mean_span, self.seed = density, mean_span, seed

    def next_batch(self) -> dict:
        rngs = self.row_rngs(self.seed)
        x, _ = self.loader.next_batch()
        rows = [infill_row(row, noise_mask(len(row), self.density, self.mean_span, rng), self.mask_id, self.start_id,
                           self.end_id, rng) for row, rng in zip(x.cpu().numpy(), rngs, strict=True)]  # fmt: skip
        batch = {k: torch.tensor([r[k] for r in rows], device=x.device) for k in rows[0]}
        return {**batch, "num_tokens": int(batch["idx"].numel())}
