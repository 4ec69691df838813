"""A first-time user's own text: one English and one Chinese file for the tokenizer, one `input.txt` for
pretraining (nanoGPT's layout), and a corpus too small to split.  Run: pytest tests/test_own_text.py"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.corpora import corpus_files, shakespeare_files, untag_line


@pytest.fixture(scope="module")
def en_zh(tmp_path_factory) -> tuple[Path, Path]:
    """~1 MB of English (Shakespeare) and ~0.6 MB of Chinese news (People's Daily 1998), one file each."""
    root = tmp_path_factory.mktemp("enzh")
    en = root / "english.txt"
    en.write_text("".join(p.read_text(encoding="utf-8") for p in shakespeare_files()[:8])[:1_000_000])
    (news,) = corpus_files(["people-daily-1998"], root / "corpus")
    zh = root / "chinese.txt"
    zh.write_bytes(news.read_bytes()[:600_000].rsplit(b"\n", 1)[0] + b"\n")
    return en, zh


def test_untag_line():
    assert untag_line("迈向/v  充满/v  [中共/nt  中央/nt]nt  ，/w  １９９８年/t") == "迈向充满中共中央，１９９８年"


def test_two_file_english_chinese_tokenizer_keeps_both_languages(en_zh, tmp_path, capsys):
    en, zh = en_zh
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(en), str(zh), "--vocab-size", "4096", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "train_report.json").read_text())
    files = report["files"]
    # Both files train and both are held out in part: neither is lost to the held-out side.
    assert files[str(en)]["train_docs"] > 20 and files[str(en)]["heldout_docs"] >= 2
    assert files[str(zh)]["train_docs"] > 20 and files[str(zh)]["heldout_docs"] >= 2
    assert report["vocab_scripts"]["Han"] > 300  # the vocabulary holds Chinese tokens
    by_lang = report["heldout_by_language"]
    assert by_lang["zh"]["bytes_per_token"] > 2.0 and by_lang["en"]["bytes_per_token"] > 3.0
    assert "held-out bytes/token by language: " in printed and "Han " in printed


def test_single_file_corpus_gets_a_val_split_and_pretraining_validates(tmp_path, capsys):
    corpus = tmp_path / "input.txt"  # one file, as nanoGPT's users start
    corpus.write_text("".join(p.read_text(encoding="utf-8") for p in shakespeare_files()[:2]))
    tok, shards, run = tmp_path / "tok", tmp_path / "shards", tmp_path / "run"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--out", str(tok)]) == 0
    assert main(["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(shards),
                 "--val-fraction", "0.05", "--workers", "1"]) == 0  # fmt: skip
    index = json.loads((shards / "index.json").read_text())
    counts = index["files"][str(corpus)]
    assert counts["val_docs"] >= 1 and counts["train_docs"] > 10 * counts["val_docs"]
    assert sum(e["num_docs"] for e in index["splits"]["val"]) == counts["val_docs"]
    assert main(["pretrain", "--data", str(shards), "--out", str(run), "--max-steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--set", "model.n_layer=1", "--set", "model.d_model=32",
                 "--set", "warmup_steps=1", "--set", "eval_batches=1"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "val_bpb" in r] == [2]
    assert "will not validate" not in capsys.readouterr().err


def test_corpus_too_small_to_split_says_so(tmp_path, capsys):
    corpus = tmp_path / "one.txt"
    corpus.write_text("A single short paragraph of text, far below one document's size. " * 20)
    tok, shards = tmp_path / "tok", tmp_path / "shards"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert "no held-out documents: the corpus has 1 document(s)" in capsys.readouterr().err
    assert main(["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(shards),
                 "--workers", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "one document only, so no validation split (pretraining will not validate)" in err
    assert main(["pretrain", "--data", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--batch-size", "1", "--seq-len", "16", "--set", "model.n_layer=1", "--set", "model.d_model=32",
                 "--set", "warmup_steps=0"]) == 0  # fmt: skip
    assert "this run will not validate (no val_loss, no bits per byte)" in capsys.readouterr().err


def test_tokenize_bad_input_leaves_no_folder(tmp_path, capsys):
    tok = tmp_path / "tok"
    good = tmp_path / "good.txt"
    good.write_text("Some text to train on. " * 200)
    assert main(["tokenizer", "train", "--input", str(good), "--vocab-size", "300", "--out", str(tok)]) == 0
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00broken")
    out = tmp_path / "shards"
    assert main(["data", "tokenize", "--input", str(bad), "--tokenizer", str(tok), "--out", str(out)]) == 2
    assert "bad.txt: not valid UTF-8" in capsys.readouterr().err and not out.exists()
