"""`lmforge tokenizer train` and `lmforge tokenizer extend`.

    lmforge tokenizer train --input corpus/ --vocab-size 8192 --out runs/tok
    lmforge tokenizer train --model wordpiece --input corpus/ --vocab-size 8000 --out runs/wp   # BERT's
    lmforge tokenizer extend --base runs/tok --input zh/ --add 2000 --out runs/tok-zh

Inputs are any format lmforge reads (lmforge/data/readers.py), strictly: the first unreadable record is a
one-line error. Flags are generated from the configs below (each field's comment is its help text); the
`tokenizer` section of an `lmforge run` recipe is checked against `TokenizerTrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.data.textsplit import TextSplitFields


@dataclass(frozen=True)
class TokenizerInputs(TextSplitFields):
    """What both tokenizer commands read, and how much of it is held out to measure bytes per token."""

    # files or folders in any format lmforge reads (txt, JSONL, JSON, Parquet, HTML, WARC, hf:NAME)
    input: list[str] = field(default_factory=list, metadata={"metavar": "FILE_OR_DIR"})
    out: str = ""  # output folder (tokenizer.json, tokenizer_config.json, train_report.json)
    text_field: str = "text"  # the field holding the text in record inputs (JSONL, JSON, Parquet, datasets)
    heldout_fraction: float = 0.05  # share of each input file's documents held out to measure bytes per token
    min_frequency: int = 2  # least count for a merge

    def input_checks(self) -> list[tuple[bool, str]]:
        self.text_split()  # raises on a bad doc_sep / doc_bytes
        return [
            (bool(self.input), "needs --input (files or folders)"),
            (bool(self.out), "needs --out (the tokenizer folder to write)"),
            (0 <= self.heldout_fraction < 1, "heldout_fraction must be in [0, 1)"),
            (self.min_frequency >= 1, "min_frequency must be >= 1"),
        ]


@dataclass(frozen=True)
class TokenizerTrainConfig(TokenizerInputs):
    """`lmforge tokenizer train`: a byte-level BPE (Hugging Face tokenizers) on a corpus."""

    vocab_size: int = 0  # vocabulary size, special tokens included (required)
    model_max_length: int = 2048  # model_max_length written to tokenizer_config.json for transformers
    # bpe: byte-level BPE, the decoder's (GPT-2, Llama); wordpiece: BERT's, for encoders ([CLS] [SEP] [MASK] [PAD]
    # [UNK]; Chinese split per character; loads as transformers' BertTokenizerFast)
    model: str = "bpe"
    lowercase: bool = True  # wordpiece: lowercase and strip accents (bert-base-uncased); --no-lowercase keeps case

    def validate(self) -> TokenizerTrainConfig:
        require([*self.input_checks(), (self.vocab_size > 0, "needs --vocab-size (e.g. 8192)"),
                 (self.model in ("bpe", "wordpiece"), f"model must be bpe or wordpiece, got {self.model!r}")])  # fmt: skip
        return self


@dataclass(frozen=True)
class TokenizerExtendConfig(TokenizerInputs):
    """`lmforge tokenizer extend`: add tokens learned on new text, keeping every existing id."""

    base: str = ""  # tokenizer folder to extend
    add: int = 0  # number of new tokens (required)

    def validate(self) -> TokenizerExtendConfig:
        require([*self.input_checks(), (bool(self.base), "needs --base (the tokenizer to extend)"),
                 (self.add > 0, "needs --add (how many new tokens)")])  # fmt: skip
        return self


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train (BPE or WordPiece) or extend a tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    add_config_command(sub, "train", "train a tokenizer (byte-level BPE or WordPiece) on a corpus", TokenizerTrainConfig, train,
                       description=__doc__)  # fmt: skip
    add_config_command(sub, "extend", "add tokens learned on new text, keeping every existing id",
                       TokenizerExtendConfig, extend, description=__doc__)  # fmt: skip


def train(cfg: TokenizerTrainConfig) -> dict:
    from lmforge.tokenizer.train import format_report, train_tokenizer

    report = train_tokenizer(
        cfg.input, cfg.vocab_size, cfg.out, min_frequency=cfg.min_frequency, heldout_fraction=cfg.heldout_fraction,
        text_field=cfg.text_field, split=cfg.text_split(), model_max_length=cfg.model_max_length, show_progress=True,
        model=cfg.model, lowercase=cfg.lowercase,
    )  # fmt: skip
    print(format_report(report, cfg.out))
    return report


def extend(cfg: TokenizerExtendConfig) -> dict:
    from lmforge.tokenizer.extend import extend_tokenizer, format_report

    report = extend_tokenizer(
        cfg.base, cfg.input, cfg.add, cfg.out, min_frequency=cfg.min_frequency,
        heldout_fraction=cfg.heldout_fraction, text_field=cfg.text_field, split=cfg.text_split(),
    )  # fmt: skip
    print(format_report(report, cfg.out))
    return report
