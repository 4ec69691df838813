"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a text corpus.

    lmforge tokenizer train --input corpus/ --vocab-size 8192 --out runs/tok

Writes `DIR/tokenizer.json`, `DIR/tokenizer_config.json` (loadable unchanged by
transformers' `PreTrainedTokenizerFast.from_pretrained(DIR)` / `AutoTokenizer`) and
`DIR/train_report.json`: sizes, time, documents per input file on each side, bytes per token on
held-out documents (a share of each input file, `data/holdout.py`), overall and per language
(langid), and the share of the vocabulary per script (Latin, Han, ...), so a language the
tokenizer did not learn shows at once. `.txt` inputs split into documents as `data/textsplit.py`
says (`--doc-sep`, `--doc-bytes`).

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

from lmforge.data.holdout import FileHoldout
from lmforge.data.readers import Document, iter_docs
from lmforge.data.textsplit import TextSplit, nbytes
from lmforge.errors import LmforgeError, warn
from lmforge.fileio import atomic_dir
from lmforge.tokenizer.special import CHAT_TEMPLATE, EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS

# The pre-tokenizer splits text into pieces that BPE merges never cross. GPT-4's cl100k pattern
# (as used by Qwen2), with two changes:
# - ASCII digits are split one by one (as Qwen2 and Llama 1/2 do, instead of cl100k's groups of up to 3):
#   every number is spelled with the same 10 digit tokens, which helps small models with arithmetic and
#   spends no vocabulary on the ~1000 three-digit groups (a large share of an 8k vocab). Other numerals
#   (full-width １９９８ as Chinese and Japanese text writes dates, superscripts, Roman numerals) form runs
#   BPE may merge: split one by one they cost Chinese news ~2% of its bytes per token (BENCHMARKS.md);
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
    r"|[0-9]|[\p{N}&&[^0-9]]+"
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
    """Hold out a share of each input file's documents (`FileHoldout`) from training.

    Iterating `train_batches(docs)` yields lists of the other texts; the held-out ones collect in
    `self.texts` (up to HELDOUT_MAX_BYTES) for measuring bytes per token afterwards. When the per-file
    share holds out nothing (every file has fewer than about 1/(2 * fraction) documents), the last
    document is held out, provided its file keeps another document for training.
    """

    def __init__(self, fraction: float):
        self.split = FileHoldout(fraction, "--heldout-fraction", sides=("train", "heldout"))
        self.texts: list[str] = []
        self.kept_bytes = 0

    def _hold(self, text: str, n: int) -> None:
        if self.kept_bytes < HELDOUT_MAX_BYTES:
            self.texts.append(text)
            self.kept_bytes += n

    def train_batches(self, docs: Iterable[Document]) -> Iterator[list[str]]:
        batch, size, last, last_n = [], 0, None, 0  # `last` waits one step in case it must be the held-out doc
        for doc in docs:
            n = nbytes(doc.text)
            if self.split.assign(doc.file, n):
                self._hold(doc.text, n)
                continue
            if last is not None:
                batch.append(last.text)
                size += last_n
            last, last_n = doc, n
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if last is not None:
            counts = self.split.files[last.file]
            if self.split.fraction and not self.texts and counts["train_docs"] > 1:  # nothing held out yet
                self.split.move(last.file, last_n, held=True)
                self._hold(last.text, last_n)
            else:
                batch.append(last.text)
        if batch:
            yield batch

    def counts(self) -> dict[str, int]:
        """train_docs, train_bytes, heldout_docs, heldout_bytes (the report's keys)."""
        return self.split.totals()


def bytes_per_token(tok, texts: list[str]) -> float | None:
    """UTF-8 bytes per token over `texts` (None when there are none): higher means better compression."""
    if not texts:
        return None
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)


LANGID_CHARS = 4000  # langid reads this much of each held-out document


def bytes_per_token_by_language(tok, texts: list[str]) -> dict[str, dict]:
    """{language: {"docs", "bytes", "bytes_per_token"}} over `texts`, each document's language by langid."""
    from lmforge.data.clean.steps.language import identifier

    groups: dict[str, list[str]] = {}
    for text in texts:
        lang, _ = identifier().classify(text[:LANGID_CHARS].replace("\n", " "))
        groups.setdefault(lang, []).append(text)
    out = {}
    for lang, group in sorted(groups.items(), key=lambda kv: -sum(map(len, kv[1]))):
        out[lang] = {"docs": len(group), "bytes": sum(map(nbytes, group)),
                     "bytes_per_token": round(bytes_per_token(tok, group), 4)}  # fmt: skip
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes: each of the 256 bytes is shown as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable + [256 + i for i in range(256 - len(printable))]
    bytes_ = printable + [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(codes, bytes_)}


def script_of(text: str) -> str:
    """The script of a token's text: the Unicode script name of its first letter (Latin, Han, Cyrillic, Hangul,
    Kana, ...), else "digits" or "punctuation/space"."""
    import unicodedata

    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            if name.startswith("CJK"):
                return "Han"
            if name.startswith(("HIRAGANA", "KATAKANA")):
                return "Kana"
            return name.split(" ")[0].capitalize() or "other"
    return "digits" if any(ch.isdigit() for ch in text) else "punctuation/space"


def vocab_scripts(tok) -> dict[str, int]:
    """How many tokens of the vocabulary belong to each script (`script_of`); byte sequences that are not whole
    UTF-8 characters (pieces of a multi-byte character, which BPE learns on the way to CJK tokens) count as
    "partial UTF-8", special tokens as "special". WordPiece tokens are plain text (a `##` prefix aside)."""
    from lmforge.tokenizer.wordpiece import PREFIX, WORDPIECE_SPECIAL_TOKENS, is_wordpiece

    decode = _byte_decoder()
    wordpiece = is_wordpiece(tok)
    specials = set(WORDPIECE_SPECIAL_TOKENS if wordpiece else SPECIAL_TOKENS)
    counts: dict[str, int] = {}
    for token in tok.get_vocab(with_added_tokens=True):
        if token in specials:
            key = "special"
        elif wordpiece:
            key = script_of(token.removeprefix(PREFIX))
        else:
            try:
                key = script_of(bytes(decode[c] for c in token).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                key = "partial UTF-8"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def added_tokens_decoder(tokens: list[str]) -> dict:
    """tokenizer_config.json's `added_tokens_decoder`: the special tokens at ids 0, 1, ..."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {str(i): {"content": t, **flags} for i, t in enumerate(tokens)}


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """`tokenizer_config.json` for transformers: special-token roles and the ChatML chat template."""
    added = added_tokens_decoder(SPECIAL_TOKENS)
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


def check_special_ids(tok, specials=SPECIAL_TOKENS) -> None:
    for i, t in enumerate(specials):
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
    split: TextSplit | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    show_progress: bool = False,
    model: str = "bpe",
    lowercase: bool = True,
) -> dict:
    """Train a tokenizer on the documents under `inputs` and write the folder `out` atomically; return the report.
    model: bpe (byte-level, the decoder's) or wordpiece (BERT's, lmforge/tokenizer/wordpiece.py; `lowercase` as
    bert-base-uncased)."""
    from lmforge.tokenizer import wordpiece as wp

    if model not in ("bpe", "wordpiece"):
        raise LmforgeError(f"--model must be bpe or wordpiece, got {model!r}")
    if model == "wordpiece" and vocab_size <= len(wp.WORDPIECE_SPECIAL_TOKENS):
        raise LmforgeError(f"--vocab-size {vocab_size} is too small for WordPiece (its 5 special tokens and more)")
    if model == "bpe" and vocab_size < MIN_VOCAB:
        raise LmforgeError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if min_frequency < 1:
        raise LmforgeError(f"--min-frequency must be at least 1, got {min_frequency}")
    split = split or TextSplit()
    held = HeldOut(heldout_fraction)
    if model == "wordpiece":
        tok, trainer = (
            wp.new_wordpiece_tokenizer(lowercase),
            wp.wordpiece_trainer(vocab_size, min_frequency, show_progress),
        )
    else:
        tok, trainer = new_tokenizer(), bpe_trainer(vocab_size, min_frequency, show_progress)
    t0 = time.perf_counter()
    tok.train_from_iterator(held.train_batches(iter_docs(inputs, text_field, split)), trainer)
    seconds = time.perf_counter() - t0
    counts = held.counts()
    if counts["train_docs"] == 0:
        raise LmforgeError(f"{', '.join(map(str, inputs))}: no documents to train on")
    if model == "wordpiece":
        tok = wp.canonical_ids(tok)  # the trainer's own ids change from one process to the next
    check_special_ids(tok, wp.WORDPIECE_SPECIAL_TOKENS if model == "wordpiece" else SPECIAL_TOKENS)
    if model == "wordpiece":
        wp.add_post_processor(tok)
    if heldout_fraction > 0 and not held.texts:
        warn(f"no held-out documents: the corpus has {counts['train_docs']} document(s) and no file has two to spare; "
             "bytes per token are not measured (add text, or lower --doc-bytes)")  # fmt: skip
    report = {
        "kind": "train",
        "model": model,
        **({"lowercase": lowercase} if model == "wordpiece" else {}),
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "text_split": split.to_dict(),
        "requested_vocab_size": vocab_size,
        "vocab_size": tok.get_vocab_size(),
        "base_vocab_size": None,  # set by `lmforge tokenizer extend`: ids below it are the base tokenizer's
        "min_frequency": min_frequency,
        **counts,  # train_docs, train_bytes, heldout_docs, heldout_bytes
        "heldout_fraction": heldout_fraction,
        "heldout_eval_docs": len(held.texts),
        "heldout_bytes_per_token": bytes_per_token(tok, held.texts),
        "heldout_by_language": bytes_per_token_by_language(tok, held.texts),
        "vocab_scripts": vocab_scripts(tok),
        "files": held.split.files,
        "train_seconds": round(seconds, 3),
    }
    with atomic_dir(out) as tmp:
        if model == "wordpiece":
            write_tokenizer_files(tok, tmp, report, wp.wordpiece_config(model_max_length, lowercase))
            (tmp / "vocab.txt").write_text(wp.vocab_txt(tok), encoding="utf-8")
        else:
            write_tokenizer_files(tok, tmp, report, tokenizer_config(model_max_length))
    return report


def format_report(report: dict, out: str | Path) -> str:
    bpt = report["heldout_bytes_per_token"]
    held = (
        f"{bpt:.3f} bytes/token on {report['heldout_eval_docs']} held-out docs ({report['heldout_bytes']:,} bytes)"
        if bpt is not None
        else "no held-out docs (--heldout-fraction 0, or too few documents)"
    )
    lines = [
        (
            f"tokenizer: vocab {report['vocab_size']} trained on {report['train_docs']} docs from "
            f"{len(report['files'])} file(s) ({report['train_bytes']:,} bytes) in {report['train_seconds']:.1f}s; "
            f"{held} -> {out}"
        )
    ]
    by_lang = report.get("heldout_by_language") or {}
    if by_lang:
        lines.append("  held-out bytes/token by language: " + ", ".join(
            f"{lang} {v['bytes_per_token']:.2f} ({v['docs']} docs)" for lang, v in by_lang.items()))  # fmt: skip
    scripts = report.get("vocab_scripts") or {}
    total = sum(scripts.values()) or 1
    lines.append("  vocabulary by script: " + ", ".join(f"{k} {v / total:.0%}" for k, v in scripts.items()
                                                         if v / total >= 0.005))  # fmt: skip
    return "\n".join(lines)
