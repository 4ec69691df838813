"""`lmforge data ...` and `lmforge --help` start without importing torch: only the command being run is registered
(and imported); `lmforge --help` lists every command from the table in lmforge/cli.py, importing none."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import contextlib, io, sys
from lmforge.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["data", "clean", "--help"])
    except SystemExit:
        pass
assert "--input" in out.getvalue(), out.getvalue()
print("torch" in sys.modules)
"""


def test_data_clean_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


HELP_PROBE = """
import contextlib, io, json, sys
from lmforge.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
assert "usage: lmforge" in out.getvalue(), out.getvalue()
mine = sorted(m for m in sys.modules if m.startswith("lmforge"))
print(json.dumps({"torch": "torch" in sys.modules, "lmforge": mine}))
"""


def _probe(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, *argv], capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_help_does_not_import_torch_or_any_command():
    listing = _probe(["--help"])
    assert not listing["torch"] and set(listing["lmforge"]) == {"lmforge", "lmforge.cli", "lmforge.errors"}
    for argv in (["generate", "--help"], ["chat", "--help"], ["tokenizer", "train", "--help"]):
        assert not _probe(argv)["torch"], argv


def _choices(parser) -> dict[str, str]:
    """{command: its help line} of a parser's subcommands."""
    action = parser._subparsers._group_actions[0]
    return {a.dest: a.help for a in action._choices_actions}


def test_the_command_table_matches_what_the_modules_register():
    import argparse

    from lmforge.cli import COMMANDS, _command_modules, build_parser

    listed = build_parser(["--help"])
    eager = argparse.ArgumentParser(prog="lmforge")
    sub = eager.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        module.register(sub)
    assert _choices(listed) == _choices(eager) == {name: help_text for name, (_, help_text) in COMMANDS.items()}
    # A command registers only its own modules.
    assert set(build_parser(["data", "clean"])._subparsers._group_actions[0].choices) == {"data"}
    assert set(build_parser(["pretrain", "--help"])._subparsers._group_actions[0].choices) == {"pretrain"}
