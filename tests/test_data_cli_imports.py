"""`lmforge data ...` starts without importing torch: only the data subcommands are registered for it."""

from __future__ import annotations

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


def test_other_commands_still_registered():
    from lmforge.cli import build_parser

    sub = build_parser(["--help"])._subparsers._group_actions[0]
    assert {"data", "pretrain", "tokenizer"} <= set(sub.choices)
    assert set(build_parser(["data", "clean"])._subparsers._group_actions[0].choices) == {"data"}
