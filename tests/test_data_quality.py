"""The quality classifier: stable hashed features, the math against hand values, a real task, the CLI, the step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data import quality as q
from lmforge.data.clean.pipeline import clean_corpus
from lmforge.data.clean.steps import configure
from lmforge.data.quality_cmd import train_quality
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

ZH = "这条河在夜里慢慢上涨，到了早上，低处的田地已经被水淹没了。在山谷里生活了几十年的农民说，他们从来没有见过这样的情况。"
SMALL = q.FeatureConfig(buckets=2**16)


def _task():
    """`shakespeare_task` from benchmarks/quality_model.py (one definition for the test and the benchmark)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_model.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shakespeare_task


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


# --- features ---


def test_features_are_pinned_and_the_same_in_every_process():
    ids, counts = q.featurize("Hello world, hello WORLD", q.FeatureConfig())
    # "hello" x2, "world," "world", and the bigrams "hello world,", "world, hello", "hello world"
    assert ids.tolist() == [135695, 457859, 678378, 687655, 781562, 893811]
    assert counts.tolist() == [1, 1, 1, 2, 1, 1] and counts.sum() == 4 + 3
    code = f"from lmforge.data import quality as q; print(q.featurize({ZH!r}, q.FeatureConfig())[0].tolist())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, "PYTHONHASHSEED": s})
        for s in ("1", "2")
    ]
    seen = {p.communicate()[0].decode() for p in procs}
    assert seen == {str(q.featurize(ZH, q.FeatureConfig())[0].tolist()) + "\n"}


def test_ngram_orders_and_buckets():
    text = "the cat sat on the mat"
    uni = q.featurize(text, q.FeatureConfig(ngrams=(1,), buckets=2**20))
    both = q.featurize(text, q.FeatureConfig(ngrams=(1, 2, 3), buckets=2**20))
    assert uni[1].sum() == 6 and both[1].sum() == 6 + 5 + 4
    assert set(uni[0]) <= set(both[0])  # the unigram ids do not depend on the other orders
    tiny = q.featurize(text, q.FeatureConfig(ngrams=(1, 2), buckets=7))
    assert tiny[0].max() < 7 and tiny[1].sum() == 11
    assert q.featurize("", SMALL)[0].size == 0 and q.featurize("one", q.FeatureConfig(ngrams=(2,)))[0].size == 0
    with pytest.raises(LmforgeError, match="ngrams"):
        q.FeatureConfig(ngrams=(0,))


def test_chinese_gets_word_or_character_features(monkeypatch):
    ids, counts = q.featurize(ZH, SMALL)
    assert len(ids) > 30
    from lmforge.data.clean.steps import text

    monkeypatch.setattr(text, "_jieba", lambda: None)  # one word per character: character n-grams
    ids_chars, counts_chars = q.featurize(ZH, SMALL)
    assert counts_chars.sum() > counts.sum() and len(ids_chars) > 60


# --- math ---


def test_metrics_against_hand_values():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.3, 0.6, 0.1])
    m = q.metrics(y, p, 0.5)
    # predicted good: 0.9, 0.6 (both good), 0.6 (bad) -> tp 2, fp 1, fn 1, tn 1
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    # pairs (good, bad): 0.9 beats both, 0.6 ties 0.6 (1/2) and beats 0.1, 0.3 beats 0.1: 4.5 / 6
    assert m["auc"] == pytest.approx(4.5 / 6)
    assert q.auc(np.array([1, 0]), np.array([0.2, 0.2])) == 0.5


def test_rows_and_logits_match_a_dense_computation():
    feats = [q.featurize(t, q.FeatureConfig(buckets=50)) for t in ("a b a", "", "c d e f")]
    rows = q.stack(feats)
    dense = np.zeros((3, 50))
    for r, (ids, counts) in enumerate(feats):
        dense[r, ids] = counts / max(np.linalg.norm(counts), 1e-12)
    w = np.random.default_rng(0).normal(size=50).astype(np.float32)
    assert np.allclose(q.logits(w, 0.25, rows), dense @ w + 0.25, atol=1e-5)
    model = q.QualityModel(w, 0.25, q.FeatureConfig(buckets=50))
    probs = q.predict_proba(model, ["a b a", "", "c d e f"])
    assert [q.score(model, t) for t in ("a b a", "", "c d e f")] == pytest.approx(probs.tolist(), abs=1e-6)


def test_separable_synthetic_set_is_learned():
    rng = np.random.default_rng(0)
    good_words, bad_words = [f"g{i}" for i in range(50)], [f"b{i}" for i in range(50)]
    shared = [f"s{i}" for i in range(200)]

    def doc(own):  # mostly shared words; a few class words decide
        return " ".join(rng.choice(shared + own * 1, size=40).tolist() + rng.choice(own, size=3).tolist())

    texts = [doc(good_words) for _ in range(300)] + [doc(bad_words) for _ in range(300)]
    labels = np.array([1] * 300 + [0] * 300)
    feats = [q.featurize(t, SMALL) for t in texts]
    tr, va = q.split(labels, 0.2, seed=0)
    assert len(va) == 120 and not set(tr) & set(va)
    w, b, history = q.train(q.stack([feats[i] for i in tr]), labels[tr], SMALL.buckets, q.TrainConfig())
    assert history[-1] < history[0]
    p = q.sigmoid(q.logits(w, b, q.stack([feats[i] for i in va])))
    assert q.metrics(labels[va], p)["accuracy"] == 1.0


def test_real_task_shakespeare_vs_shuffled_and_spam():
    good, bad, kinds = _task()(plays=8)  # 2,662 documents of 12 lines; see benchmarks/quality_model.py
    texts, labels = good + bad, np.array([1] * len(good) + [0] * len(bad))
    feats = [q.featurize(t, q.FeatureConfig()) for t in texts]
    tr, va = q.split(labels, 0.2, seed=0)
    w, b, _ = q.train(q.stack([feats[i] for i in tr]), labels[tr], 2**20, q.TrainConfig())
    p = q.sigmoid(q.logits(w, b, q.stack([feats[i] for i in va])))
    m = q.metrics(labels[va], p)
    # measured over split seeds 0-5: accuracy 0.957-0.972, AUC 0.995-0.998 (chance: 0.5)
    assert m["accuracy"] > 0.93 and m["auc"] > 0.99, m
    shuffled = np.array([""] * len(good) + kinds)[va] == "shuffled"
    assert (p[shuffled] < 0.5).mean() > 0.75  # word salad of real words (measured 0.84-0.91): bigrams catch it


# --- files and CLI ---


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    good, bad, _ = _task()(plays=1)
    root = tmp_path_factory.mktemp("quality")
    return _jsonl(root / "good.jsonl", good), _jsonl(root / "bad.jsonl", bad)


@pytest.fixture(scope="module")
def model_dir(sets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "q"
    train_quality([sets[0]], [sets[1]], out, features=SMALL)
    return out


def test_cli_trains_and_saves_a_self_describing_model(sets, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["data", "train-quality", "--good", str(sets[0]), "--bad", str(sets[1]), "--out", str(out)]
    assert main([*argv, "--buckets", "2**16", "--epochs", "3", "--ngrams", "1,2"]) == 0
    printed = capsys.readouterr().out
    assert "held out: accuracy" in printed and "AUC" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quality_model.json"]
    meta = json.loads((out / "quality_model.json").read_text())
    assert meta["features"] == {"ngrams": [1, 2], "buckets": 2**16, "lowercase": True} and meta["threshold"] == 0.5
    report = meta["report"]
    assert report["train"]["epochs"] == 3 and report["held_out"]["accuracy"] > 0.8
    assert set(report["held_out"]) >= {"accuracy", "precision", "recall", "f1", "auc"}
    model = q.load(out)
    assert model.weight.shape == (2**16,) and model.weight.dtype == np.float32
    assert model.info["report"] == report


def test_cli_bad_input_is_one_line_error(sets, tmp_path, capsys):
    empty = _jsonl(tmp_path / "empty.jsonl", ["", " \n "])
    one = _jsonl(tmp_path / "one.jsonl", ["a single bad document"])
    binary = tmp_path / "junk.txt"
    binary.write_bytes(b"\xff\xfe\x00junk")
    cases = {
        "no documents": ["--good", str(empty), "--bad", str(sets[1])],
        "at least 2 documents of each class": ["--good", str(sets[0]), "--bad", str(one)],
        "given as both": ["--good", str(sets[0]), "--bad", str(sets[0])],
        "not valid UTF-8": ["--good", str(sets[0]), "--bad", str(binary)],
        "no such file": ["--good", str(sets[0]), "--bad", str(tmp_path / "missing")],
        "val-fraction": ["--good", str(sets[0]), "--bad", str(sets[1]), "--val-fraction", "1"],
    }
    for message, args in cases.items():
        assert main(["data", "train-quality", *args, "--out", str(tmp_path / "q")]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


def test_load_rejects_missing_and_corrupt_models(model_dir, tmp_path):
    with pytest.raises(LmforgeError, match="no such quality model folder"):
        q.load(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "quality_model.json").write_text((model_dir / "quality_model.json").read_text())
    data = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="corrupt or truncated"):
        q.load(broken)
    (broken / "quality_model.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        q.load(broken)


# --- the cleaning step ---


def test_step_records_score_and_rejects_below_threshold(model_dir, sets):
    good = json.loads(sets[0].read_text().splitlines()[0])["text"]
    step, cfg = configure("quality_model", {"model": str(model_dir)})
    assert cfg.threshold == 0.5
    doc = step.apply(Document(id="g", text=good), cfg)
    assert isinstance(doc, Document) and doc.metadata["quality_score"] > 0.5
    spam = "Best deals of 2024! Buy now, free shipping!!!\nClick here to subscribe to our newsletter."
    d = Document(id="s", text=spam)
    reason = step.apply(d, cfg)
    assert reason == f"quality score {int(d.metadata['quality_score'] * 100) / 100:.2f} < 0.50", reason
    _, strict = configure("quality_model", {"model": str(model_dir), "threshold": 0.999999})
    assert step.apply(Document(id="g", text=good), strict).endswith("< 0.999999")
    with pytest.raises(LmforgeError, match="`model`.*required"):
        configure("quality_model")
    with pytest.raises(LmforgeError, match="no such quality model folder"):
        configure("quality_model", {"model": str(model_dir.parent / "missing")})


def test_step_inside_clean_corpus(model_dir, sets, tmp_path):
    steps = [{"name": "normalize"}, {"name": "quality_model", "model": str(model_dir)}]
    reports = {w: clean_corpus(list(sets), tmp_path / f"w{w}", steps=steps, workers=w, progress=False) for w in (1, 2)}
    report = reports[1]
    c = report["counts"]
    n_good, n_bad = (len(p.read_text().splitlines()) for p in sets)
    assert c["input"] == n_good + n_bad == c["kept"] + c["rejected"] and report["identity_holds"]
    assert report["per_step"]["quality_model"]["in"] == n_good + n_bad
    assert report["per_step"]["quality_model"]["rejected"] == c["rejected"] > n_bad * 0.8
    assert all(k.startswith("quality_model/quality score ") for k in report["per_reason"])
    kept = [json.loads(x) for x in (tmp_path / "w1/kept/part-00000.jsonl").read_text().splitlines()]
    assert all(r["metadata"]["quality_score"] >= 0.5 for r in kept)
    for name in ("kept", "rejected"):  # forked workers use the model loaded before the fork: same output
        assert (tmp_path / f"w1/{name}/part-00000.jsonl").read_bytes() == (
            tmp_path / f"w2/{name}/part-00000.jsonl"
        ).read_bytes()
