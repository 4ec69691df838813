"""`lmforge data clean` end to end: bad input is counted, never lost; output independent of --workers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.clean.pipeline import clean_corpus, load_config
from lmforge.errors import LmforgeError

STEPS = [
    {"name": "extract_html"},
    {"name": "normalize"},
    {"name": "gopher_quality", "min_words": 20},
    {"name": "pii"},
    {"name": "exact_dedup"},
]


def _passages(n: int) -> list[str]:
    from lmforge.run import shakespeare_files

    lines = [ln for ln in shakespeare_files()[1].read_text(encoding="utf-8").splitlines() if ln.strip()]
    return ["\n".join(lines[i * 30 : (i + 1) * 30]) for i in range(n)]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def messy(tmp_path) -> Path:
    """A folder of good documents mixed with every kind of bad input."""
    src = tmp_path / "raw"
    src.mkdir()
    texts = _passages(8)
    _jsonl(src / "a.jsonl", [
        {"id": "a1", "text": texts[0], "url": "http://x/1"},
        "{not json",
        {"id": "a3", "body": "no text field"},
        {"text": "too short"},
        {"id": "a5", "text": texts[0]},  # exact duplicate of a1
        {"id": "a6", "text": texts[1] + "\nmail me: someone@example.com"},
    ])  # fmt: skip
    data = "".join(json.dumps({"id": f"g{i}", "text": t}) + "\n" for i, t in enumerate(texts[2:]))
    whole = gzip.compress(data.encode())
    (src / "b.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])  # truncated
    (src / "c.jsonl").write_bytes(b'{"text": "ok \xff\xfe"}\n')  # invalid UTF-8 line
    (src / "d.txt").write_bytes(bytes(range(256)) * 4)  # binary junk
    (src / "e.jsonl").write_text("")  # empty input
    (src / "f.txt").write_text(texts[7], encoding="utf-8")
    (src / "g.bin").write_bytes(b"\x00\x01")  # unsupported type
    (src / "h.html").write_text(f"<html><body><nav>Home</nav><article><p>{texts[6]}</p></article></body></html>")
    return src


def test_accounting_with_bad_input(messy, tmp_path):
    report = clean_corpus([messy], tmp_path / "out", steps=STEPS, workers=1, progress=False)
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == report
    kept, rejected = _read(out / "kept/part-00000.jsonl"), _read(out / "rejected/part-00000.jsonl")
    c = report["counts"]
    assert c["input"] == c["kept"] + c["rejected"] + c["unreadable"] and report["identity_holds"]
    assert (c["kept"], c["rejected"]) == (len(kept), len(rejected))
    why = {(Path(u["file"]).name, u["line"]): u["why"] for u in report["unreadable"]}
    assert "not valid JSON" in why[("a.jsonl", 2)] and "no 'text' field" in why[("a.jsonl", 3)]
    assert "truncated" in next(w for (f, _), w in why.items() if f == "b.jsonl.gz")
    assert "not valid UTF-8 (byte 0xff at offset 13)" in why[("c.jsonl", 1)] and "binary" in why[("d.txt", None)]
    assert why[("e.jsonl", None)] == "empty file" and "unsupported" in why[("g.bin", None)]
    for f, n in report["per_file"].items():
        assert n["input"] == n["kept"] + n["rejected"] + n["unreadable"], f
    assert report["per_file"][str(messy / "a.jsonl")] == {"input": 6, "kept": 2, "rejected": 2, "unreadable": 2}
    assert report["per_reason"]["gopher_quality/too_few_words"] == 1
    assert report["per_reason"]["exact_dedup/exact_duplicate"] == 1
    a1 = next(r for r in kept if r["id"] == "a1")
    assert a1["metadata"]["url"] == "http://x/1" and a1["source"].endswith("a.jsonl:1")
    assert "<EMAIL>" in next(r for r in kept if r["id"] == "a6")["text"]
    dup = next(r for r in rejected if r["id"] == "a5")
    assert (dup["step"], dup["reason"], dup["metadata"]["duplicate_of"]) == ("exact_dedup", "exact_duplicate", "a1")
    assert any(r["id"].startswith("g") for r in kept)  # lines before the cut in the .gz survive
    page = next(r for r in kept if r["id"] == "h.html")
    assert "Home" not in page["text"] and "html" not in page["metadata"]


def test_output_does_not_depend_on_workers(tmp_path, monkeypatch):
    from lmforge.data.clean import pipeline

    monkeypatch.setattr(pipeline, "CHUNK_DOCS", 3)  # several chunks in flight
    texts = _passages(20)
    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts + texts[:2] + ["short"])])
    steps = STEPS + [{"name": "minhash_dedup"}]
    r1 = clean_corpus([src], tmp_path / "w1", steps=steps, workers=1, progress=False)
    r2 = clean_corpus([src], tmp_path / "w2", steps=steps, workers=2, progress=False)
    for part in ("kept/part-00000.jsonl", "rejected/part-00000.jsonl"):
        assert (tmp_path / "w1" / part).read_bytes() == (tmp_path / "w2" / part).read_bytes()
    assert r1["counts"] == r2["counts"] and r1["counts"]["rejected"] == 3
    assert [r["id"] for r in _read(tmp_path / "w1/kept/part-00000.jsonl")] == [str(i) for i in range(20)]


def test_cli_config_and_errors(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _passages(3)])
    cfg = tmp_path / "p.yaml"
    cfg.write_text("steps:\n  - name: normalize\n  - name: gopher_quality\n    min_words: 10\n")
    assert main(["data", "clean", "--input", str(src), "--out", str(tmp_path / "o"), "--config", str(cfg),
                 "--workers", "1"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["normalize", "gopher_quality"]
    assert report["steps"][1]["min_words"] == 10 and report["counts"]["kept"] == 3
    assert "3 == 3 + 0 + 0" in capsys.readouterr().out

    for argv, msg in [
        (["--steps", "normalize,bogus"], "unknown cleaning step 'bogus'"),
        (["--input", str(tmp_path / "missing.jsonl")], "no such file or folder"),
        (["--steps", "normalize", "--languages", "en"], "--languages needs the `language` step"),
    ]:
        base = ["data", "clean", "--input", str(src), "--out", str(tmp_path / "x")]
        assert main(base + argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    cfg.write_text("steps:\n  - name: c4\n    min_sentencez: 2\n")
    assert main(["data", "clean", "--input", str(src), "--out", str(tmp_path / "x"), "--config", str(cfg)]) == 2
    assert "min_sentencez" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="unknown key"):
        cfg.write_text("stepz: []\n")
        load_config(cfg)
