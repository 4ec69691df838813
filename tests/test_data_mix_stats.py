"""`lmforge data mix` (weights, epochs, caps, seeds, report) and `lmforge data stats` (clean and mix outputs)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.mix import mix_sources, parse_source_spec
from lmforge.data.stats import data_stats


def _passages(n: int, lines_per_doc: int = 12, skip: int = 0) -> list[str]:
    """n distinct passages of real text (Shakespeare), each `lines_per_doc` non-blank lines."""
    from lmforge.run import shakespeare_files

    lines = [ln for ln in shakespeare_files()[1].read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines = lines[skip:]
    return ["\n".join(lines[i * lines_per_doc : (i + 1) * lines_per_doc]) for i in range(n)]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Three sources: `web` (200 docs, a folder of two files), `books` (60 long docs), `wiki` (20 docs)."""
    root = tmp_path_factory.mktemp("sources")
    texts = _passages(280, lines_per_doc=6)
    _jsonl(
        root / "web" / "a.jsonl",
        [{"id": f"w{i}", "text": t, "url": f"http://x/{i}"} for i, t in enumerate(texts[:120])],
    )
    _jsonl(root / "web" / "b.jsonl", [{"id": f"w{i}", "text": t} for i, t in enumerate(texts[120:200], start=120)])
    long = _passages(60, lines_per_doc=30, skip=3000)
    _jsonl(root / "books.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(long)])
    _jsonl(root / "wiki.jsonl", [{"id": f"k{i}", "text": t} for i, t in enumerate(texts[200:220])])
    return {"web": root / "web", "books": root / "books.jsonl", "wiki": root / "wiki.jsonl"}


def _src(corpora, name, **kw) -> dict:
    return {"name": name, "path": str(corpora[name]), **kw}


def test_doc_shares_are_exact(corpora, tmp_path):
    sources = [_src(corpora, "web", weight=2), _src(corpora, "books", weight=1), _src(corpora, "wiki", weight=1)]
    report = mix_sources(sources, tmp_path / "m", total_docs=80, seed=1, progress=False)
    records = _read(tmp_path / "m" / "mixed.jsonl")
    by_source = collections.Counter(r["source"] for r in records)
    assert by_source == {"web": 40, "books": 20, "wiki": 20} and report["total"]["docs"] == 80
    assert [s["share"] for s in report["sources"]] == [0.5, 0.25, 0.25] and not report["warnings"]
    web = report["sources"][0]
    assert web["available"]["docs"] == 200 and web["files"] == 2 and web["dropped_by_cap"] == 160
    assert web["available"]["approx_tokens"] == web["available"]["bytes"] // 4 and "/ 4" in report["token_estimate"]
    assert all(set(r) >= {"id", "text", "source", "epoch", "origin"} and r["epoch"] == 0 for r in records)
    web_a = [r for r in records if r["origin"].startswith(str(corpora["web"] / "a.jsonl:"))]
    assert web_a and all(r["url"] == f"http://x/{r['id'][1:]}" for r in web_a)  # other fields are kept
    assert len({(r["source"], r["id"]) for r in records}) == 80  # capped sources: no document twice
    assert json.loads((tmp_path / "m" / "mix_report.json").read_text()) == report
    # Sources are spread through the file, not in blocks: each quarter holds some of every source.
    for q in range(4):
        assert {r["source"] for r in records[q * 20 : (q + 1) * 20]} == {"web", "books", "wiki"}


def test_token_shares_within_tolerance(corpora, tmp_path):
    sources = [_src(corpora, "web", weight=3), _src(corpora, "books", weight=1)]
    report = mix_sources(sources, tmp_path / "m", seed=0, progress=False)  # no total: largest that meets weights
    assert report["unit"] == "tokens"
    got = collections.Counter()
    for r in _read(tmp_path / "m" / "mixed.jsonl"):
        got[r["source"]] += len(r["text"].encode("utf-8"))
    share = got["web"] / (got["web"] + got["books"])
    assert abs(share - 0.75) < 0.03 and abs(report["sources"][0]["share"] - share) < 1e-6
    # books are long: web limits the total (all of web, once), books are capped
    assert report["sources"][0]["output"]["docs"] == 200 and report["sources"][1]["dropped_by_cap"] > 0


def test_oversampling_epochs_and_running_out(corpora, tmp_path, capsys):
    sources = [_src(corpora, "web"), _src(corpora, "wiki", max_epochs=3)]
    report = mix_sources(sources, tmp_path / "a", total_docs=100, progress=False)
    wiki = report["sources"][1]
    assert (
        wiki["output"]["docs"] == 50 and wiki["epochs"] == 2.5 and wiki["docs_per_epoch"] == {"0": 20, "1": 20, "2": 10}
    )
    assert wiki["repeated_docs"] == 30 and wiki["dropped_by_cap"] == 0 and not wiki["ran_out"]
    copies = collections.Counter(r["id"] for r in _read(tmp_path / "a/mixed.jsonl") if r["source"] == "wiki")
    assert sorted(collections.Counter(copies.values()).items()) == [(2, 10), (3, 10)]  # seen once before twice
    assert capsys.readouterr().err == ""

    # 50% of 200 docs would need 5 passes over wiki; max_epochs 3 gives 60: say so, fill with web.
    report = mix_sources(sources, tmp_path / "b", total_docs=200, progress=False)
    err = capsys.readouterr().err
    assert "source 'wiki'" in err and "runs out at 60" in err and "max_epochs 3" in err
    wiki = report["sources"][1]
    assert wiki["ran_out"] and wiki["output"]["docs"] == 60 and wiki["docs_per_epoch"] == {"0": 20, "1": 20, "2": 20}
    assert report["sources"][0]["output"]["docs"] == 140 and report["total"]["docs"] == 200
    assert len(report["warnings"]) == 1 and "wiki" in report["warnings"][0]

    # max_docs caps a large source (repeats counted); everything short of the total is said too
    sources = [_src(corpora, "web", max_docs=30), _src(corpora, "wiki", max_epochs=2)]
    report = mix_sources(sources, tmp_path / "c", total_docs=100, progress=False)
    assert [s["output"]["docs"] for s in report["sources"]] == [30, 40]
    assert report["sources"][0]["dropped_by_cap"] == 170 and len(report["warnings"]) == 3
    assert "short of the requested total 100" in capsys.readouterr().err


def test_seed_determinism(corpora, tmp_path):
    sources = [_src(corpora, "web"), _src(corpora, "wiki", max_epochs=2.5), _src(corpora, "books", weight=0.5)]
    runs = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        mix_sources(sources, tmp_path / name, total_docs=90, seed=seed, progress=False)
        runs[name] = (tmp_path / name / "mixed.jsonl").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    order = [[(r["source"], r["id"], r["epoch"]) for r in _read(tmp_path / n / "mixed.jsonl")] for n in "ac"]
    assert order[0] != order[1] and len(order[0]) == len(order[1]) == 90


def test_hand_off_to_tokenize(corpora, tmp_path):
    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    sources = [_src(corpora, "web"), _src(corpora, "wiki", max_epochs=2)]
    report = mix_sources(sources, tmp_path / "m", total_docs=60, progress=False)
    train_tokenizer([corpora["wiki"]], 300, tmp_path / "tok")
    index = tokenize_corpus([tmp_path / "m"], tmp_path / "tok", tmp_path / "shards", workers=1, progress=False)
    docs = sum(e["num_docs"] for entries in index["splits"].values() for e in entries)
    nbytes = sum(e["num_bytes"] for entries in index["splits"].values() for e in entries)
    assert docs == report["total"]["docs"] == 60 and nbytes == report["total"]["bytes"]


def test_cli_config_and_bad_input(corpora, tmp_path, capsys):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        f"sources:\n  - {{name: web, path: {corpora['web']}, weight: 1}}\n"
        f"  - {{name: wiki, path: {corpora['wiki']}, weight: 1, max_epochs: 2}}\ntotal_docs: 40\nseed: 3\n"
    )
    assert main(["data", "mix", "--config", str(cfg), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "40 docs" in out and "wiki" in out
    report = json.loads((tmp_path / "m" / "mix_report.json").read_text())
    assert report["seed"] == 3 and [s["output"]["docs"] for s in report["sources"]] == [20, 20]
    assert main(["data", "mix", "--source", f"wiki={corpora['wiki']}:weight=2:epochs=1.5", "--source",
                 f"web={corpora['web']}:max_docs=10", "--out", str(tmp_path / "n")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "n" / "mix_report.json").read_text())
    assert [(s["name"], s["weight"], s["max_epochs"], s["max_docs"]) for s in report["sources"]] == [
        ("wiki", 2.0, 1.5, None), ("web", 1.0, 1.0, 10)]  # fmt: skip
    assert parse_source_spec("x=C:/data/a.jsonl:weight=2") == {"name": "x", "path": "C:/data/a.jsonl", "weight": 2.0}

    ok = f"web={corpora['web']}"
    for argv, msg in [
        (["--source", f"web={tmp_path / 'missing.jsonl'}"], "no such file or folder"),
        (["--source", f"{ok}:weight=0"], "weight must be a number > 0"),
        (["--source", f"{ok}:weight=-1"], "weight must be a number > 0"),
        (["--source", f"{ok}:weight=abc"], "is not a number"),
        (["--source", f"{ok}:wieght=2"], "unknown option 'wieght'"),
        (["--source", str(corpora["web"])], "expected NAME=PATH"),
        (["--source", ok, "--source", ok], "given twice"),
        (["--source", ok, "--total-docs", "0"], "--total-docs must be"),
        ([], "no sources given"),
    ]:
        assert main(["data", "mix", "--out", str(tmp_path / "x"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("lmforge: error:"), (argv, err)
    assert not (tmp_path / "x" / "mixed.jsonl").exists()


SHORT = "The king and the queen are walking in the castle garden with all of their good friends."


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory) -> Path:
    """A `clean_corpus` output with rejections by several steps, two languages and two sources."""
    from lmforge.data.clean.pipeline import clean_corpus

    root = tmp_path_factory.mktemp("clean")
    texts = _passages(12)
    zh = "今天天气很好，我们去公园散步吧。这个模型在中文数据上训练了三天。我喜欢在周末读书和写代码。" * 4
    records = [{"id": f"e{i}", "text": t, "source": "plays"} for i, t in enumerate(texts)]
    records += [{"id": "dup", "text": texts[0], "source": "plays"}, {"id": "short", "text": SHORT, "source": "web"},
                {"id": "zh", "text": zh, "source": "web"}, {"id": "empty", "text": "  ", "source": "web"}]  # fmt: skip
    _jsonl(root / "raw" / "in.jsonl", records)
    (root / "raw" / "bad.jsonl").write_text('{"id": "broken"\n', encoding="utf-8")
    steps = [{"name": "normalize"}, {"name": "language", "languages": ["en"]},
             {"name": "gopher_quality", "min_words": 20}, {"name": "exact_dedup"}]  # fmt: skip
    clean_corpus([root / "raw"], root / "out", steps=steps, workers=1, progress=False)
    return root / "out"


def test_stats_on_clean_output(cleaned, tmp_path, capsys):
    report = json.loads((cleaned / "report.json").read_text())
    assert report["counts"] == {"input": 17, "kept": 12, "rejected": 4, "unreadable": 1}
    stats = data_stats(cleaned, tmp_path / "plots")
    for png in ("per_step.png", "per_reason.png", "per_language.png", "per_source.png", "lengths.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    saved = json.loads((tmp_path / "plots" / "stats.json").read_text())
    assert (
        saved["per_reason"] == stats["per_reason"] and saved["accounting_holds"] and "words" in saved["token_counting"]
    )
    assert {k: v["rejected_docs"] for k, v in stats["per_reason"].items()} == report["per_reason"]
    assert stats["per_reason"]["language/language_not_kept"]["rejected_tokens"] == 41 * 4  # CJK characters
    assert stats["per_step"]["gopher_quality"] == {"in": 14, "rejected_docs": 1, "rejected_tokens": len(SHORT.split())}
    assert stats["per_language"]["en"]["kept_docs"] == 12 and stats["per_language"]["zh"]["rejected_docs"] == 1
    plays, web = stats["per_source"]["plays"], stats["per_source"]["web"]  # `source` metadata, not the file
    assert (plays["kept_docs"], plays["rejected_docs"], web["rejected_docs"], web.get("kept_docs", 0)) == (12, 1, 3, 0)
    lengths = stats["lengths"]
    assert (lengths["before"]["docs"], lengths["after"]["docs"]) == (16, 12)
    assert sum(lengths["before"]["histogram"]) == 16 and sum(lengths["after"]["histogram"]) == 12
    words = sum(len(r["text"].split()) for r in _read(cleaned / "kept" / "part-00000.jsonl"))
    assert lengths["after"]["tokens"] == words

    assert main(["data", "stats", str(cleaned), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "input == kept + rejected + unreadable: 17 == 12 + 4 + 1" in out and "language/language_not_kept" in out
    (cleaned / "kept" / "extra.jsonl").write_text('{"text": "one more"}\n')  # files no longer match the report
    try:
        assert main(["data", "stats", str(cleaned), "--out", str(tmp_path / "cli")]) == 1
        assert "DOES NOT HOLD" in capsys.readouterr().out
    finally:
        (cleaned / "kept" / "extra.jsonl").unlink()


def test_stats_with_tokenizer_and_on_mix_output(cleaned, corpora, tmp_path):
    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer([corpora["wiki"]], 300, tmp_path / "tok")
    stats = data_stats(cleaned, tmp_path / "p", tokenizer=tmp_path / "tok")
    assert "tokenizer" in stats["token_counting"] and stats["unit"] == "tokens"
    assert stats["lengths"]["after"]["tokens"] > 2 * data_stats(cleaned, tmp_path / "w")["lengths"]["after"]["tokens"]

    mix_sources([_src(corpora, "web"), _src(corpora, "wiki", max_epochs=2)], tmp_path / "m", total_docs=60,
                progress=False)  # fmt: skip
    stats = data_stats(tmp_path / "m")
    assert stats["kind"] == "mix" and stats["accounting_holds"]
    assert {k: (v["docs"], v["share_docs"]) for k, v in stats["per_source"].items()} == {
        "web": (30, 0.5), "wiki": (30, 0.5)}  # fmt: skip
    assert stats["per_source"]["wiki"]["docs_per_epoch"] == {"0": 20, "1": 10}
    for f in ("shares.png", "per_source.png", "lengths.png", "stats.json"):
        assert (tmp_path / "m" / "stats" / f).is_file()


def test_stats_bad_input(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "old" / "kept").mkdir(parents=True)
    (tmp_path / "old" / "report.json").write_text('{"kept": 3}')
    for folder, msg in [(tmp_path / "plain", "not an output of `lmforge data clean`"),
                        (tmp_path / "nope", "no such folder"),
                        (tmp_path / "old", "not a report this version writes (no counts, per_step, unreadable)")]:  # fmt: skip
        assert main(["data", "stats", str(folder)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1


def test_stats_plots_say_how_many_sources_they_leave_out_without_warnings(tmp_path, capsys):
    import warnings

    texts = _passages(70, lines_per_doc=2)
    sources = []
    for i in range(35):  # more than a plot shows; long names, as input paths often are
        name = f"crawl-segment-{i:02d}-" + "x" * 60
        path = _jsonl(tmp_path / f"s{i}.jsonl", [{"text": t} for t in texts[2 * i : 2 * i + 2]])
        sources.append({"name": name, "path": str(path)})
    mix_sources(sources, tmp_path / "m", total_docs=70, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's tight_layout warning reached the console before
        assert main(["data", "stats", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "per_source.png, shares.png, lengths.png: only the 30 largest plotted, 5 sources of 35 left out" in out
    saved = json.loads((tmp_path / "m" / "stats" / "stats.json").read_text())
    assert saved["plots_left_out"] == {p: "5 sources of 35" for p in ("per_source.png", "shares.png", "lengths.png")}
    assert len(saved["per_source"]) == 35  # the tables keep every source


def test_stats_of_a_clean_run_that_rejected_nothing(tmp_path, capsys):
    """A clean run writes rejected/part-00000.jsonl even when it is empty: stats reads it as no records."""
    from lmforge.cli import main

    (tmp_path / "a.txt").write_text("Hello world, this is a document.\n\nAnother paragraph here.\n")
    assert main(["data", "clean", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "c"),
                 "--steps", "normalize"]) == 0  # fmt: skip
    assert (tmp_path / "c" / "rejected" / "part-00000.jsonl").stat().st_size == 0
    assert main(["data", "stats", str(tmp_path / "c")]) == 0
