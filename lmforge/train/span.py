"""Span corruption, T5's pretraining objective: what `lmforge pretrain --preset t5-mini` trains on.

    lmforge pretrain --preset t5-mini --data shards/ --out runs/t5 --max-steps 600     # objective: span

From each window of the token stream, `noise_density` (15%) of the tokens, in spans of mean length
`mean_span` (3), are cut out (Raffel et al. 2020, section 3.1.4; `random_spans_noise_mask` of the T5 code): the
input keeps the rest with each span replaced by a sentinel, the target lists each sentinel followed by its span,
and both end with the end-of-text token:

    input:  Thank you <X> me to your party <Y> week . </s>
    target: <X> for inviting <Y> last <Z> </s>          (the decoder reads it shifted right behind the start id)

The sentinels are the top rows of the model's vocabulary (`sentinel_ids`: the tokenizer's size plus 100, rounded
up to 64, so no text token is ever one), as T5's `<extra_id_N>` are its last ids. The window length is chosen so
the input is exactly `seq_len` tokens (`window_length`). Spans are drawn from (seed, where the row starts in the
stream), so a resumed run corrupts exactly as one never stopped, on any number of processes.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.loader import LoaderView

N_SENTINELS = 100


def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window: round(length x density) tokens (at least 1, at most length - 1) in
    round(noise / mean_span) spans (at least 1)."""
    noise = min(max(round(length * density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def window_length(input_len: int, density: float, mean_span: float) -> int:
    """The longest window whose corrupted input (kept tokens + one sentinel per span + end) fits input_len."""
    length = input_len
    while True:
        noise, spans = span_counts(length + 1, density, mean_span)
        if length + 1 - noise + spans + 1 > input_len:
            return length
        length += 1


def _segments(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positive lengths summing to total, uniformly at random (a random composition)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=n - 1, replace=False)) if n > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of `length` with the noise spans True: spans and gaps interleave, kept text first, as T5's
    random_spans_noise_mask draws them."""
    noise, spans = span_counts(length, density, mean_span)
    noise_lengths = _segments(noise, spans, rng)
    keep_lengths = _segments(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, cut in zip(keep_lengths, noise_lengths, strict=True):
        pos += keep
        mask[pos : pos + cut] = True
        pos += cut
    return mask


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: list[int], eos: int) -> tuple[list, list]:
    """(input ids, target ids) of one window: each masked span becomes the next sentinel in the input, and the
    target lists each sentinel and its span; both end with eos."""
    src, tgt, i, n = [], [], 0, 0
    while i < len(tokens):
        if not mask[i]:
            src.append(int(tokens[i]))
            i += 1
            continue
        src.append(sentinels[n])
        tgt.append(sentinels[n])
        while i < len(tokens) and mask[i]:
            tgt.append(int(tokens[i]))
            i += 1
        n += 1
    return src + [eos], tgt + [eos]


def sentinel_ids(vocab_rows: int) -> list[int]:
    """The sentinel ids, the model's last N_SENTINELS rows, first sentinel the highest (T5's <extra_id_0>)."""
    return [vocab_rows - 1 - i for i in range(N_SENTINELS)]


class SpanBatches(LoaderView):
    """Span-corrupted batches from a TokenLoader of `window_length(seq_len)` tokens: `next_batch()` ->
    {src, tgt_in, targets, num_tokens}; state is the loader's."""

    def __init__(self, loader, vocab_rows: int, eos: int, start: int, *, density=0.15, mean_span=3.0, seed=0):
        self.loader, self.sentinels, self.eos, self.start = loader, sentinel_ids(vocab_rows), eos, start
        self.density, self.mean_span, self.seed = density, mean_span, seed

    def next_batch(self) -> dict:
        rngs = self.row_rngs(self.seed)
        x, _ = self.loader.next_batch()
        rows = [corrupt_spans(row, noise_mask(len(row), self.density, self.mean_span, rng), self.sentinels, self.eos)
                for row, rng in zip(x.cpu().numpy(), rngs, strict=True)]  # fmt: skip
        src = torch.tensor([r[0] for r in rows], device=x.device)
        targets = torch.tensor([r[1] for r in rows], device=x.device)
        tgt_in = torch.cat([torch.full_like(targets[:, :1], self.start), targets[:, :-1]], 1)
        return {"src": src, "tgt_in": tgt_in, "targets": targets, "num_tokens": int(src.numel() + targets.numel())}
