"""A record over `max_record_bytes` (the issue's "single 100 MB line", here with a small limit) is skipped and
counted unreadable with its file and line, never a crash or a silent loss; the lines after it are read."""

from __future__ import annotations

import gzip
import json

from lmforge.data.clean.pipeline import clean_corpus
from lmforge.data.readers import read_file


def _line(text: str) -> str:
    return json.dumps({"text": text}) + "\n"


def test_long_jsonl_line_is_unreadable_and_reading_goes_on(tmp_path):
    exact = "a" * (100 - len(_line("")) + 1)  # a record of exactly 100 bytes, newline not counted
    body = _line("first") + _line("x" * 5000) + _line(exact) + _line("after")
    for name, write in (("a.jsonl", lambda p: p.write_text(body)), ("a.jsonl.gz", lambda p: p.write_bytes(
        gzip.compress(body.encode())))):  # fmt: skip
        path = tmp_path / name
        write(path)
        bad = []
        docs = list(read_file(path, bad, max_record_bytes=100))
        assert [d.text for d in docs] == ["first", exact, "after"]
        assert [d.source for d in docs] == [f"{path}:1", f"{path}:3", f"{path}:4"]
        assert [(b.line, b.why) for b in bad] == [(2, "record too large (5,012 bytes; max_record_bytes is 100)")]


def test_long_last_line_without_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(_line("first") + _line("y" * 300).rstrip("\n"))
    bad = []
    assert [d.text for d in read_file(path, bad, max_record_bytes=100)] == ["first"]
    assert [(b.line, b.why.split(" (")[0]) for b in bad] == [(2, "record too large")]


def test_clean_counts_large_records(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(_line("ok " * 10) + _line("z " * 500))
    (tmp_path / "in" / "big.txt").write_text("word " * 100)
    (tmp_path / "in" / "small.txt").write_text("word " * 10)
    report = clean_corpus(
        [tmp_path / "in"], tmp_path / "out", steps=[{"name": "normalize"}], workers=1, progress=False,
        max_record_bytes=200,
    )  # fmt: skip
    # A .txt file is not one record: it splits into documents of at most doc_bytes (textsplit.py), so its size
    # is no reason to skip it.
    assert report["counts"] == {"input": 4, "kept": 3, "rejected": 0, "unreadable": 1}
    assert report["identity_holds"]
    where = {(u["file"].rsplit("/", 1)[-1], u["line"]) for u in report["unreadable"]}
    assert where == {("a.jsonl", 2)}
    assert all("record too large" in u["why"] for u in report["unreadable"])
