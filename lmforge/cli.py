"""`lmforge <stage>`: one subcommand per pipeline stage.

    lmforge --help
    lmforge run                      # the demo recipe end to end
    lmforge tokenizer train ...      # then: data tokenize, pretrain, generate

Each stage module defines `register(subparsers)`, which adds its subcommand and
sets `func` to a function taking the parsed arguments. Any `LmforgeError`
becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.errors import LmforgeError


def _data_modules() -> list:
    # `lmforge data ...` needs only these, none of which imports torch (tests/test_data_cli_imports.py checks it).
    from lmforge.data import mix, quality_cmd, tokenize_cmd
    from lmforge.data import stats as data_stats
    from lmforge.data.clean import cli as clean_cli

    return [tokenize_cmd, clean_cli, quality_cmd, mix, data_stats]


def _command_modules() -> list:
    # Imported here, not at module top, so `import lmforge.cli` stays cheap and side-effect free.
    from lmforge import params, run
    from lmforge.align import best_of_n, dpo, grpo, ppo, prefs, reward
    from lmforge.data import mix, quality_cmd, tokenize_cmd
    from lmforge.data import stats as data_stats
    from lmforge.data.clean import cli as clean_cli
    from lmforge.hub import export_cmd, import_cmd
    from lmforge.serve import chat_cmd, generate_cmd
    from lmforge.tokenizer import cli as tokenizer_cli
    from lmforge.train import bench, pretrain, sft

    return [
        run,
        tokenizer_cli,
        tokenize_cmd,
        clean_cli,
        quality_cmd,
        mix,
        data_stats,
        params,
        pretrain,
        sft,
        prefs,
        reward,
        dpo,
        grpo,
        ppo,
        best_of_n,
        generate_cmd,
        chat_cmd,
        bench,
        import_cmd,
        export_cmd,
    ]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (default `sys.argv[1:]`): every command, or only the `data` ones for a `data` command."""
    parser = argparse.ArgumentParser(prog="lmforge", description="Build a language model end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # A `data` command registers only the data modules: the others import torch (~1.5 s), which cleaning, mixing
    # or inspecting a corpus never needs.
    data_only = (sys.argv[1:] if argv is None else argv)[:1] == ["data"]
    for module in _data_modules() if data_only else _command_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(argv).parse_args(argv)  # inside: building the parser imports the commands
        rc = args.func(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
