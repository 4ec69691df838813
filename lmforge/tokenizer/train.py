"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a text corpus.

    lmforge tokenizer train --input corpus/ --vocab-size 8192 --out runs/tok

Writes `DIR/tokenizer.json`, `DIR/tokenizer_config.json` (loadable unchanged by
transformers' `PreTrainedTokenizerFast.from_pretrained(DIR)` / `AutoTokenizer`) and
`DIR/train_report.json` (sizes, time, bytes per token on a held-out slice).

Byte-level BPE as in GPT-2 (Radford et al. 2019): the 256 byte symbols are the
initial alphabet, so every string is encodable and there is no UNK token. The
special tokens of `special.py` take ids 0..3. No normalizer: decode(encode(x)) == x
for every valid Unicode string.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.data.readers import iter_texts
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.tokenizer.special import CHAT_TEMPLATE, EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS

# The pre-tokenizer splits text into pieces that BPE merges never cross. GPT-4's cl100k pattern
# (as used by Qwen2), with two changes:
# - digits are split one by one (`\p{N}`, as Qwen2 and Llama 1/2 do, instead of cl100k's groups of up to 3):
#   every number is spelled with the same 10 digit tokens, which helps small models with arithmetic and
#   spends no vocabulary on the ~1000 three-digit groups (a large share of an 8k vocab);
# - Han characters form their own runs (` ?\p{Han}+`), apart from other letters: Chinese has no spaces, so
#   with plain `\p{L}+` a whole sentence mixed with Latin letters would be one huge pre-token. A Han run is
#   still one pre-token (BPE learns multi-character words inside it), and "AI模型" splits into "AI" + "模型".
#   Kana and Hangul stay in the letter class.
# The rest is cl100k: English contractions, a letter run with one optional leading non-letter (" the",
# "(the"), punctuation runs with an optional leading space, newlines kept together with the whitespace
# before them, and `\s+(?!\S)` leaving the last space of a run to prefix the next word.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"| ?\p{Han}+"
    r"|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
HELDOUT_MAX_BYTES = 20_000_000  # held-out documents beyond this are left out of training but not kept for eval
BATCH_BYTES = 1_000_000  # texts are handed to the trainer in batches of about this size
DEFAULT_MODEL_MAX_LENGTH = 2048


def new_tokenizer():
    """An untrained byte-level BPE `tokenizers.Tokenizer` with lmforge's pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def bpe_trainer(vocab_size: int, min_frequency: int = 2, show_progress: bool = False):
    from tokenizers import pre_tokenizers, trainers

    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )


class HeldOut:
    """Deterministically hold out every k-th document (k = round(1 / fraction)) from training.

    Iterating `train_batches(docs)` yields lists of the other texts; the held-out ones collect in
    `self.texts` (up to HELDOUT_MAX_BYTES) for measuring bytes per token afterwards. A corpus with
    fewer than k documents (but at least 2) holds out its last one, so there is always something to
    measure on.
    """

    def __init__(self, fraction: float):
        if not 0 <= fraction < 1:
            raise LmforgeError(f"--heldout-fraction must be in [0, 1), got {fraction}")
        self.every = round(1 / fraction) if fraction > 0 else 0
        self.texts: list[str] = []
        self.held_docs = self.held_bytes = 0
        self.train_docs = self.train_bytes = 0

    def _hold(self, text: str, n: int) -> None:
        self.held_docs += 1
        if self.held_bytes < HELDOUT_MAX_BYTES:
            self.texts.append(text)
            self.held_bytes += n

    def train_batches(self, docs: Iterable[str]) -> Iterator[list[str]]:
        batch, size, last = [], 0, None  # `last` waits one step in case it must be the held-out doc
        for i, text in enumerate(docs):
            n = len(text.encode("utf-8"))
            if self.every and i % self.every == self.every - 1:
                self._hold(text, n)
                continue
            if last is not None:
                batch.append(last[0])
                size += last[1]
                self.train_docs += 1
                self.train_bytes += last[1]
            last = (text, n)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if last is not None:
            if self.every and self.held_docs == 0 and self.train_docs > 0:
                self._hold(*last)
            else:
                batch.append(last[0])
                self.train_docs += 1
                self.train_bytes += last[1]
        if batch:
            yield batch


def bytes_per_token(tok, texts: list[str]) -> float | None:
    """UTF-8 bytes per token over `texts` (None when there are none): higher means better compression."""
    if not texts:
        return None
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """`tokenizer_config.json` for transformers: special-token roles and the ChatML chat template."""
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "added_tokens_decoder": added,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(tok, folder: Path, report: dict, config: dict) -> None:
    """Write tokenizer.json, tokenizer_config.json and train_report.json into `folder` (a temp dir)."""
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "train_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def check_special_ids(tok) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # an lmforge invariant, not a user error
            raise RuntimeError(f"special token {t} has id {tok.token_to_id(t)}, expected {i}")


def train_tokenizer(
    inputs: list[str | Path],
    vocab_size: int,
    out: str | Path,
    *,
    min_frequency: int = 2,
    heldout_fraction: float = 0.05,
    text_field: str = "text",
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    show_progress: bool = False,
) -> dict:
    """Train a tokenizer on the documents under `inputs` and write the folder `out` atomically; return the report."""
    if vocab_size < MIN_VOCAB:
        raise LmforgeError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if min_frequency < 1:
        raise LmforgeError(f"--min-frequency must be at least 1, got {min_frequency}")
    held = HeldOut(heldout_fraction)
    docs = (text for text, _ in iter_texts(inputs, text_field))
    tok = new_tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(held.train_batches(docs), bpe_trainer(vocab_size, min_frequency, show_progress))
    seconds = time.perf_counter() - t0
    if held.train_docs == 0:
        raise LmforgeError(f"{', '.join(map(str, inputs))}: no documents to train on")
    check_special_ids(tok)
    report = {
        "kind": "train",
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "requested_vocab_size": vocab_size,
        "vocab_size": tok.get_vocab_size(),
        "base_vocab_size": None,  # set by `lmforge tokenizer extend`: ids below it are the base tokenizer's
        "min_frequency": min_frequency,
        "train_docs": held.train_docs,
        "train_bytes": held.train_bytes,
        "heldout_every": held.every,
        "heldout_eval_docs": len(held.texts),
        "heldout_docs": held.held_docs,
        "heldout_bytes": held.held_bytes,
        "heldout_bytes_per_token": bytes_per_token(tok, held.texts),
        "train_seconds": round(seconds, 3),
    }
    with atomic_dir(out) as tmp:
        write_tokenizer_files(tok, tmp, report, tokenizer_config(model_max_length))
    return report


def format_report(report: dict, out: str | Path) -> str:
    bpt = report["heldout_bytes_per_token"]
    held = (
        f"{bpt:.3f} bytes/token on {report['heldout_eval_docs']} held-out docs ({report['heldout_bytes']:,} bytes)"
        if bpt is not None
        else "no held-out docs (--heldout-fraction 0, or a single document)"
    )
    return (
        f"tokenizer: vocab {report['vocab_size']} trained on {report['train_docs']} docs "
        f"({report['train_bytes']:,} bytes) in {report['train_seconds']:.1f}s; {held} -> {out}"
    )
