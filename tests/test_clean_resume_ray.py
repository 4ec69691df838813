"""`lmforge data clean` at scale: sharded per-document stage, resume after `kill -9` byte-identical to an
uninterrupted run, stale shards refused, and `--executor ray` identical to `--executor local`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.clean import pipeline
from lmforge.data.clean.pipeline import RUN_KEYS, clean_corpus

STEPS = [
    {"name": "normalize"},
    {"name": "gopher_quality", "min_words": 20},
    {"name": "pii"},
    {"name": "exact_dedup"},
    {"name": "minhash_dedup"},
]
PARTS = ("kept/part-00000.jsonl", "rejected/part-00000.jsonl")

# Runs `lmforge ARGS...` and SIGKILLs itself on call number AFTER + 1 of TARGET (module.attribute).
KILLER = """
import importlib, os, signal, sys
from lmforge.cli import main
target, after, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
module, name = target.rsplit(".", 1)
owner = importlib.import_module(module)
original, calls = getattr(owner, name), [0]
def dying(*a, **k):
    calls[0] += 1
    if calls[0] > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*a, **k)
setattr(owner, name, dying)
sys.exit(main(args))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Two JSONL files (duplicates, near-duplicates, short texts, bad lines) and a config YAML."""
    from lmforge.run import shakespeare_files

    root = tmp_path_factory.mktemp("corpus")
    lines = [ln for ln in shakespeare_files()[2].read_text(encoding="utf-8").splitlines() if ln.strip()]
    texts = ["\n".join(lines[i * 25 : (i + 1) * 25]) for i in range(30)]
    a = [{"id": f"a{i}", "text": t} for i, t in enumerate(texts[:18])] + [{"id": "a-short", "text": "too short"}]
    b = [{"id": f"b{i}", "text": t} for i, t in enumerate(texts[18:])]
    b += [{"id": "b-dup", "text": texts[3]}, {"id": "b-near", "text": texts[5] + " Exit."}, {"id": "b-mail",
          "text": texts[7] + "\nwrite to someone@example.com"}]  # fmt: skip
    src = root / "raw"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a) + "{not json\n")
    (src / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b) + '{"id": "no-text"}\n')
    cfg = root / "clean.yaml"
    cfg.write_text(json.dumps({"steps": STEPS, "shard_docs": 3}))  # JSON is YAML
    return src, cfg


def _args(src: Path, cfg: Path, out: Path, *more: str) -> list[str]:
    return ["data", "clean", "--input", str(src), "--out", str(out), "--config", str(cfg), *more]


def _report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {k: v for k, v in report.items() if k not in RUN_KEYS}


def _same_outputs(a: Path, b: Path) -> None:
    for part in PARTS:
        assert (a / part).read_bytes() == (b / part).read_bytes(), part
    assert _report(a) == _report(b)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, after, reused",
    [
        ("os.replace", 4, 3),  # manifest + 3 shards renamed, the 4th shard's folder written but not renamed
        ("shutil.copyfileobj", 1, "all"),  # every shard done, killed while writing kept/ and rejected/
    ],
)
def test_resume_after_kill_is_byte_identical(corpus, tmp_path, target, after, reused):
    src, cfg = corpus
    out = tmp_path / "out"
    assert main(_args(src, cfg, out, "--workers", "1")) == 0
    ref = out.rename(tmp_path / "reference")  # the same --out for both runs: report.json names it

    killer = [sys.executable, "-c", KILLER, target, str(after), *_args(src, cfg, out, "--workers", "2")]
    killed = subprocess.run(
        killer, check=False, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert killed.returncode == -9, killed.stderr
    assert not (out / "report.json").exists() and (out / ".work/manifest.json").is_file()
    assert list(out.rglob(".*.tmp"))  # the kill left a half-written shard folder or output file behind

    rerun = [sys.executable, "-m", "lmforge", *_args(src, cfg, out, "--workers", "1")]
    resumed = subprocess.run(rerun, check=False, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    shards = report["shards"]
    assert shards["reused"] == (shards["total"] if reused == "all" else reused) and shards["total"] == 12
    assert "shards reused" in resumed.stdout
    _same_outputs(ref, out)
    assert not (out / ".work").exists() and not list(out.rglob(".*.tmp"))
    c = report["counts"]
    assert c["input"] == c["kept"] + c["rejected"] + c["unreadable"] == 36 and c["unreadable"] == 2


class Crash(Exception):
    pass


def _crash_after(monkeypatch, n: int) -> None:
    """Make the run fail right after committing `n` shards (in this process: workers=1)."""
    commit, calls = pipeline._commit_shard, [0]

    def failing(*args):
        if calls[0] == n:
            raise Crash
        calls[0] += 1
        commit(*args)

    monkeypatch.setattr(pipeline, "_commit_shard", failing)


def test_stale_shards_are_refused_then_restart(corpus, tmp_path, monkeypatch, capsys):
    src, cfg = corpus
    clean_corpus([src], tmp_path / "reference", steps=STEPS, workers=1, shard_docs=3, progress=False)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(Crash):
            clean_corpus([src], out, steps=STEPS, workers=1, shard_docs=3, progress=False)
    assert len(list((out / ".work/shards").iterdir())) == 2

    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"steps": STEPS[:-1], "shard_docs": 3}))
    assert main(_args(src, other, out)) == 2
    err = capsys.readouterr().err
    assert "other steps" in err and "--restart" in err and "new --out" in err and err.count("\n") == 1
    assert main(_args(src, cfg, out, "--shard-docs", "4")) == 2
    assert "other shards" in capsys.readouterr().err
    os.utime(src / "b.jsonl", ns=(0, 0))  # the same bytes, another mtime: the input may have changed
    assert main(_args(src, cfg, out)) == 2
    assert "other inputs" in capsys.readouterr().err
    assert len(list((out / ".work/shards").iterdir())) == 2  # refusing touched nothing

    report = clean_corpus([src], out, steps=STEPS, workers=1, shard_docs=3, progress=False, restart=True)
    assert report["shards"] == {"total": 12, "reused": 0, "docs_per_shard": 3}
    for part in PARTS:
        assert (tmp_path / "reference" / part).read_bytes() == (out / part).read_bytes()
    # Finished: the work folder is gone, so another config simply runs (nothing stale is left to reuse).
    assert main(_args(src, other, out)) == 0


def test_no_documents_at_all(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{broken\n\n{also broken\n")
    (tmp_path / "empty.txt").write_text("")
    report = clean_corpus([tmp_path], tmp_path / "out", steps=STEPS, workers=1, progress=False)
    assert report["counts"] == {"input": 3, "kept": 0, "rejected": 0, "unreadable": 3}
    assert report["shards"]["total"] == 1 and (tmp_path / "out/kept/part-00000.jsonl").read_text() == ""


def test_ray_missing_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    src, cfg = corpus
    monkeypatch.setitem(sys.modules, "ray", None)  # importlib.util.find_spec("ray") -> None
    assert main(_args(src, cfg, tmp_path / "out", "--executor", "ray")) == 2
    err = capsys.readouterr().err
    assert "pip install 'lmforge[ray]'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_executor_matches_local_and_resumes_local_shards(corpus, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    src, _ = corpus
    local = tmp_path / "local"
    clean_corpus([src], local, steps=STEPS, workers=2, shard_docs=3, progress=False)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it for good; later forked pools would inherit it
    ray.init(num_cpus=2, include_dashboard=False)  # one instance for both runs (clean_corpus leaves it up)
    try:
        out = tmp_path / "ray"
        report = clean_corpus([src], out, steps=STEPS, workers=2, shard_docs=3, progress=False, executor="ray")
        assert report["executor"] == "ray" and report["shards"]["reused"] == 0
        for part in PARTS:
            assert (local / part).read_bytes() == (out / part).read_bytes()

        resumed = tmp_path / "resumed"  # shards committed by local workers, the rest by Ray tasks
        with monkeypatch.context() as m:
            _crash_after(m, 4)
            with pytest.raises(Crash):
                clean_corpus([src], resumed, steps=STEPS, workers=1, shard_docs=3, progress=False)
        report = clean_corpus([src], resumed, steps=STEPS, workers=2, shard_docs=3, progress=False, executor="ray")
        assert report["shards"]["reused"] == 4
        for part in PARTS:
            assert (local / part).read_bytes() == (resumed / part).read_bytes()
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)
