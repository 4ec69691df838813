"""Masked-language-model batches: what `lmforge pretrain --objective mlm` trains an encoder on.

    lmforge pretrain --preset bert-mini --data shards-wp/ --out runs/bert --max-steps 300
    lmforge pretrain --preset albert-base --data shards-wp/ --out runs/albert --sentence-task sop --whole-word

Each row is a window of the token stream wrapped as `[CLS] x [SEP]`, or with a sentence task as
`[CLS] A [SEP] B [SEP]` (token types 0, then 1; A's length drawn uniformly): NSP (BERT) replaces B half the time
by a segment from a random place in the corpus, SOP (ALBERT) swaps A and B half the time; the classifier on
[CLS] says which. Windows run across document boundaries (the stream's [SEP]s), as RoBERTa's FULL-SENTENCES
input does (Liu et al. 2019), rather than BERT's sentence-aligned pairs.

Masking is BERT's (Devlin et al. 2019): `mask_rate` (15%) of each row's maskable tokens are predicted, of which
80% become [MASK], 10% a random token, 10% stay. `dynamic` draws new positions every time a window is read
(RoBERTa); `static` draws them from the window's place in the corpus, so every epoch sees the same masks (BERT's
preprocessing, without its 10 copies). `whole_word` masks words, not pieces: a `##` piece goes with the piece
before it and runs of Chinese characters are cut into words by jieba (Cui et al. 2019, BERT-wwm, who used LTP).
Each row's masks (and sentence pair) are drawn from (seed, where the row starts in the stream), so a resumed run
masks exactly as an uninterrupted one, a run on N processes as a run on one, and nothing but the loader's position
is saved.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from lmforge.data.loader import LoaderView
from lmforge.errors import LmforgeError
from lmforge.model.losses import IGNORE_INDEX
from lmforge.tokenizer.wordpiece import CLS, MASK, PAD, PREFIX, SEP, UNK

SENTENCE_TASKS = ("none", "nsp", "sop")
MASKINGS = ("dynamic", "static")


# ----------------------------------------------------------------------------- pure functions

Generators = torch.Generator | list[torch.Generator]


def _draw(sample: Callable, shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """`sample(shape, generator=...)` (torch.rand, a partial torch.randint) from one generator, or with a list of
    generators row b of the (B, ...) result from generator[b]."""
    if isinstance(generator, torch.Generator):
        return sample(shape, generator=generator)
    return torch.stack([sample(shape[1:], generator=g) for g in generator])


def choose_masked(maskable: torch.Tensor, rate: float, generator: Generators,
                  word_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Which positions of each row (B, T) to predict: round(rate x the row's maskable tokens), at least 1 when it
    has any, uniformly at random. With word_ids (B, T) (the same id for the pieces of one word) whole words are
    drawn in random order while they fit the budget, as BERT's create_masked_lm_predictions does. `generator`: one
    for the batch, or one per row."""
    B, T = maskable.shape
    chosen = torch.zeros_like(maskable)
    budget = (maskable.sum(1).float() * rate).round().clamp(min=1).long()
    scores = _draw(torch.rand, (B, T), generator)
    for row in range(B):
        cand = maskable[row].nonzero().flatten()
        if len(cand) == 0:
            continue
        n = int(budget[row])
        if word_ids is None:
            pick = cand[scores[row, cand].argsort()[:n]]
            chosen[row, pick] = True
            continue
        words, inverse = torch.unique(word_ids[row, cand], return_inverse=True)
        order = scores[row, : len(words)].argsort()  # a random order of the row's words
        sizes = torch.bincount(inverse, minlength=len(words))[order]
        keep = order[(sizes.cumsum(0) <= n) | (torch.arange(len(words)) == 0)]  # words that fit; always the first
        chosen[row, cand[torch.isin(inverse, keep)]] = True
    return chosen


def corrupt(ids: torch.Tensor, chosen: torch.Tensor, mask_id: int, random_ids: tuple[int, int],
            generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BERT's 80/10/10: (inputs, targets) where chosen positions become [MASK] (80%), a random id in
    [random_ids[0], random_ids[1]) (10%) or stay (10%), and targets hold the original id there, -100 elsewhere."""
    roll = _draw(torch.rand, tuple(ids.shape), generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = _draw(functools.partial(torch.randint, *random_ids), tuple(ids.shape), generator)[swap]
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, targets


def word_ids(ids: torch.Tensor, continues: torch.Tensor, chars: list[str] | None = None) -> torch.Tensor:
    """(B, T) word numbers: a token whose `continues[id]` is True (a `##` piece) joins the word before it. With
    `chars` (id -> its single CJK character, or ""), runs of such tokens are cut into words by jieba."""
    starts = ~continues[ids]
    if chars is not None:
        import jieba

        jieba.setLogLevel(60)  # no "Building prefix dict" chatter
        for row in range(ids.shape[0]):
            text = [chars[i] for i in ids[row].tolist()]
            t = 0
            while t < len(text):
                if not text[t]:
                    t += 1
                    continue
                end = t
                while end < len(text) and text[end]:
                    end += 1
                pos = t
                for word in jieba.lcut("".join(text[t:end]), HMM=False):
                    starts[row, pos + 1 : pos + len(word)] = False
                    pos += len(word)
                t = end
    return starts.long().cumsum(1)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0xF900 <= cp <= 0xFAFF


# ----------------------------------------------------------------------------- batches


class MlmVocab:
    """What masking needs from a WordPiece tokenizer: special ids, the `##` table, single-CJK-character tokens."""

    def __init__(self, tok, where):
        vocab = tok.get_vocab(with_added_tokens=True)
        missing = [t for t in (CLS, SEP, MASK, PAD) if t not in vocab]
        if missing:
            raise LmforgeError(f"{where}: the tokenizer has no {missing[0]}: masked-LM training needs a WordPiece "
                               "tokenizer (`lmforge tokenizer train --model wordpiece`)")  # fmt: skip
        self.cls, self.sep, self.mask, self.pad = vocab[CLS], vocab[SEP], vocab[MASK], vocab[PAD]
        self.size = max(vocab.values()) + 1
        specials = {vocab[t] for t in (CLS, SEP, MASK, PAD, UNK) if t in vocab}
        self.special = torch.zeros(self.size, dtype=torch.bool)
        self.special[list(specials)] = True
        self.continues = torch.zeros(self.size, dtype=torch.bool)
        self.chars = [""] * self.size
        for token, i in vocab.items():
            self.continues[i] = token.startswith(PREFIX)
            if len(token) == 1 and _is_cjk(token):
                self.chars[i] = token
        self.random_ids = (max(specials) + 1, self.size)  # the 10% random replacements: ordinary tokens

    def words(self, ids: torch.Tensor) -> torch.Tensor:
        return word_ids(ids, self.continues, self.chars if any(self.chars) else None)


class MlmBatches(LoaderView):
    """Masked batches from a TokenLoader whose seq_len is the model's minus the [CLS]/[SEP]s (`specials(task)`):
    `next_batch()` -> {idx, targets, token_types[, labels], num_tokens}; state is the loader's."""

    def __init__(self, loader, vocab: MlmVocab, *, rate: float = 0.15, masking: str = "dynamic",
                 whole_word: bool = False, sentence_task: str = "none", seed: int = 0):  # fmt: skip
        self.loader, self.vocab, self.rate, self.masking = loader, vocab, rate, masking
        self.whole_word, self.task, self.seed = whole_word, sentence_task, seed

    @staticmethod
    def specials(task: str) -> int:
        return 3 if task != "none" else 2

    def next_batch(self) -> dict:
        total = self.loader.stream.total
        starts = [s % total if self.masking == "static" else s for s in self.loader.row_starts()]
        gens = [torch.Generator().manual_seed(hash((self.seed, s)) & (2**63 - 1)) for s in starts]
        x, _ = self.loader.next_batch()
        rows = [self._pair(window, g) for window, g in zip(x.cpu(), gens, strict=True)]
        ids, types = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        v = self.vocab
        chosen = choose_masked(~v.special[ids], self.rate, gens, v.words(ids) if self.whole_word else None)
        inputs, targets = corrupt(ids, chosen, v.mask, v.random_ids, gens)
        batch = {"idx": inputs, "targets": targets, "token_types": types}
        if self.task != "none":
            batch["labels"] = torch.tensor([r[2] for r in rows])
        return {**{k: t.to(x.device) for k, t in batch.items()}, "num_tokens": int(ids.numel())}

    def _pair(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One window x (L,) as (ids, token types, label): [CLS] x [SEP], or with a sentence task [CLS] A [SEP] B
        [SEP] with the label 1 where B is not A's continuation in place (its draws from g)."""
        v, L = self.vocab, len(x)
        cls, sep = torch.tensor([v.cls]), torch.tensor([v.sep])
        if self.task == "none":
            return torch.cat([cls, x, sep]), torch.zeros(L + 2, dtype=torch.long), 0
        cut = int(torch.randint(1, L, (1,), generator=g))  # A's length: 1..L-1
        flip = bool(torch.rand(1, generator=g) < 0.5)
        a, b = x[:cut], x[cut:]
        if flip and self.task == "sop":
            a, b = b, a  # B then A: its A's length is L - cut, as uniform as cut, so length says nothing
        elif flip:  # nsp: B from a random place in the corpus
            start = int(torch.randint(0, self.loader.stream.total, (1,), generator=g))
            b = torch.from_numpy(self.loader.stream.read(start, len(b)).astype(np.int64))
        types = torch.zeros(L + 3, dtype=torch.long)
        types[len(a) + 2 :] = 1
        return torch.cat([cls, a, sep, b, sep]), types, int(flip)


# ----------------------------------------------------------------------------- step and evaluation


def mlm_step(autocast: Callable[[], contextlib.AbstractContextManager]):
    """The loop's step for masked batches: (loss, tokens, {mlm_loss, mlm_acc[, sentence_acc]})."""

    def step(model, batch):
        batch = dict(batch)
        n = batch.pop("num_tokens")
        with autocast():
            parts, loss = model(**batch)
        metrics = {"mlm_loss": float(parts["mlm_loss"].detach())}
        if "labels" in batch:
            metrics["sentence_acc"] = float((parts["cls_logits"].argmax(-1) == batch["labels"]).float().mean())
        return loss, n, metrics

    return step


@torch.no_grad()
def evaluate_mlm(model, batches: list[dict], autocast) -> dict:
    """Masked-token loss (nats per masked token), its accuracy, and the sentence task's accuracy over fixed
    batches (masks drawn once: the same every evaluation)."""
    was = model.training
    model.eval()
    total, right, count, s_right, s_count = 0.0, 0, 0, 0, 0
    inner = getattr(model, "module", model)  # the logits need the model's own head, not the DDP forward
    for batch in batches:
        kwargs = {k: v for k, v in batch.items() if k not in ("num_tokens", "targets", "labels")}
        with autocast:
            hidden, _ = model(**kwargs, head="hidden")
        picked = batch["targets"] != IGNORE_INDEX
        logits = inner.mlm_logits(hidden[picked]).float()
        total += float(torch.nn.functional.cross_entropy(logits, batch["targets"][picked], reduction="sum"))
        right += int((logits.argmax(-1) == batch["targets"][picked]).sum())
        count += int(picked.sum())
        if "labels" in batch:
            s_right += int((inner.class_logits(hidden).argmax(-1) == batch["labels"]).sum())
            s_count += len(batch["labels"])
    model.train(was)
    loss = total / max(1, count)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_mlm_acc": right / max(1, count)}
    if s_count:
        out["val_sentence_acc"] = s_right / s_count
    return out
