"""Special tokens every lmforge tokenizer carries, and loading a tokenizer folder.

A tokenizer folder holds `tokenizer.json` (the `tokenizers` model) and
`tokenizer_config.json` (what transformers' PreTrainedTokenizerFast reads).
The special tokens take the first ids, in this order, in every tokenizer
lmforge trains, so later stages can rely on them:

- `<|endoftext|>`: ends a document in pretraining shards (and is the BOS/EOS);
- `<|pad|>`: padding, never trained on;
- `<|im_start|>`, `<|im_end|>`: a chat turn's start (followed by the role name
  `system`, `user` or `assistant` and a newline) and its end (ChatML, the format
  SmolLM2 and Qwen use, so imported models and ours share one template).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmforge.errors import LmforgeError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, PAD, IM_START, IM_END]

# ChatML as a Jinja template (transformers' `apply_chat_template` reads it from tokenizer_config.json):
# each message is `<|im_start|>{role}\n{content}<|im_end|>\n`; a generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """A short content hash of `tokenizer.json`: shards and checkpoints record it to catch mismatches."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read tokenizer ({e.strerror or e})") from None


def document_end_id(tok) -> int | None:
    """The id that ends each document in token shards: <|endoftext|>, or a WordPiece tokenizer's [SEP] (BERT's
    corpora separate documents and sentences with it)."""
    eot = tok.token_to_id(EOT)
    return eot if eot is not None else tok.token_to_id("[SEP]")


def pad_id(tok) -> int:
    """The padding id: <|pad|>, or a WordPiece tokenizer's [PAD] (0 if neither; T5's decoder also starts from it)."""
    pad = tok.token_to_id(PAD)
    return pad if pad is not None else (tok.token_to_id("[PAD]") or 0)


def load_tokenizer(tokenizer_dir: str | Path):
    """Load `DIR/tokenizer.json` as a `tokenizers.Tokenizer`, with a one-line error if it is missing or corrupt."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise LmforgeError(f"{path}: no tokenizer here (expected a folder made by `lmforge tokenizer train`)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on bad JSON)
        raise LmforgeError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
