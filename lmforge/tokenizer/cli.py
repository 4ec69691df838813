"""`lmforge tokenizer train` and `lmforge tokenizer extend`.

lmforge tokenizer train --input corpus/ --vocab-size 8192 --out runs/tok
lmforge tokenizer extend --base runs/tok --input zh/ --add 2000 --out runs/tok-zh
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or extend a byte-level BPE tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    _add_inputs(train)
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    train.add_argument("--model-max-length", type=int, default=2048, help="model_max_length for transformers")
    train.set_defaults(func=_train)

    extend = sub.add_parser("extend", help="add tokens learned on new text, keeping every existing id")
    extend.add_argument("--base", required=True, help="tokenizer folder to extend")
    _add_inputs(extend)
    extend.add_argument("--add", type=int, required=True, help="number of new tokens")
    extend.add_argument("--out", required=True, help="output folder")
    extend.add_argument("--min-frequency", type=int, default=2, help="least count for a new merge (default 2)")
    extend.set_defaults(func=_extend)


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    from lmforge.data.readers import add_split_args

    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help=".txt, .jsonl(.gz/.zst) or .parquet files, or folders of them")  # fmt: skip
    parser.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default text)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05,
                        help="share of each input file's documents held out to measure bytes per token "
                        "(default 0.05)")  # fmt: skip
    add_split_args(parser)


def _train(args: argparse.Namespace) -> int:
    from lmforge.data.readers import split_from_args
    from lmforge.tokenizer.train import format_report, train_tokenizer

    report = train_tokenizer(
        args.input, args.vocab_size, args.out, min_frequency=args.min_frequency,
        heldout_fraction=args.heldout_fraction, text_field=args.text_field, split=split_from_args(args),
        model_max_length=args.model_max_length, show_progress=True,
    )  # fmt: skip
    print(format_report(report, args.out))
    return 0


def _extend(args: argparse.Namespace) -> int:
    from lmforge.data.readers import split_from_args
    from lmforge.tokenizer.extend import extend_tokenizer, format_report

    report = extend_tokenizer(
        args.base, args.input, args.add, args.out, min_frequency=args.min_frequency,
        heldout_fraction=args.heldout_fraction, text_field=args.text_field, split=split_from_args(args),
    )  # fmt: skip
    print(format_report(report, args.out))
    return 0
