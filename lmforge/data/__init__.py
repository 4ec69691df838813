"""Data stages: read corpora, tokenize them into shards (`lmforge data ...`).

lmforge data tokenize --input corpus/ --tokenizer runs/tok --out runs/data
"""

from __future__ import annotations


def data_subparsers(subparsers):
    """The sub-subparsers of `lmforge data`, created on first use so several modules can add `data` actions."""
    parser = subparsers.choices.get("data")
    if parser is None:
        parser = subparsers.add_parser("data", help="prepare training data (tokenize into shards, ...)")
        parser.set_defaults(data_sub=parser.add_subparsers(dest="data_command", metavar="ACTION", required=True))
    return parser.get_default("data_sub")
