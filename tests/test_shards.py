"""Token shards: the file format, `lmforge data tokenize`, and the corpus readers.  Run: pytest tests/test_shards.py"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from tok_helpers import chinese_docs, write_english_corpus

from lmforge.data.holdout import FileHoldout
from lmforge.data.readers import iter_docs, iter_texts
from lmforge.data.shards import HEADER_SIZE, load_index, open_shard, read_header, split_num_tokens, write_shard
from lmforge.data.tokenize_cmd import format_summary, tokenize_corpus
from lmforge.errors import LmforgeError
from lmforge.tokenizer.special import load_tokenizer, tokenizer_hash
from lmforge.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer (vocab 512) and a corpus of 20 English .txt docs plus 30 Chinese docs in JSONL."""
    root = tmp_path_factory.mktemp("shards")
    corpus = write_english_corpus(root / "corpus", chars=5000)
    with open(corpus / "zh.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in chinese_docs(30))
    train_tokenizer([corpus], 512, root / "tok")
    return root, corpus, root / "tok"


def _read_split(out, index, split) -> np.ndarray:
    parts = [np.asarray(open_shard(out / e["file"])) for e in index["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


@pytest.mark.parametrize(("dtype", "vocab"), [("uint16", 512), ("uint32", 100_000)])
def test_header_round_trip(tmp_path, dtype, vocab):
    tokens = np.array([5, 0, vocab - 1, 0], dtype=np.int64)
    header = {"dtype": dtype, "vocab_size": vocab, "tokenizer_hash": "abc", "eot_id": 0, "num_docs": 2,
              "num_bytes": 17}  # fmt: skip
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens, header)
    assert read_header(path) == {**header, "version": 1, "num_tokens": 4}
    assert path.stat().st_size == HEADER_SIZE + 4 * (2 if dtype == "uint16" else 4)
    assert path.read_bytes()[:8] == b"LMFSHARD"
    mm = open_shard(path)
    assert mm.dtype == np.dtype(dtype) and mm.ndim == 1 and not mm.flags.writeable
    assert mm.tolist() == tokens.tolist()


def test_truncated_or_foreign_shard_is_an_error(tmp_path):
    path = tmp_path / "train_000000.bin"
    header = {"dtype": "uint16", "vocab_size": 512, "tokenizer_hash": "h", "eot_id": 0, "num_docs": 1, "num_bytes": 9}
    write_shard(path, np.arange(100), header)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="train_000000.bin: truncated"):
        open_shard(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 2000)
    with pytest.raises(LmforgeError, match="train_000000.bin: not an lmforge token shard"):
        read_header(path)


def test_tokens_match_direct_encoding_split_by_document(setup, tmp_path):
    _, corpus, tok_dir = setup
    out = tmp_path / "data"
    index = tokenize_corpus([corpus], tok_dir, out, val_fraction=0.2, workers=1, progress=False)
    tok = load_tokenizer(tok_dir)
    expected = {"train": [], "val": []}
    docs = list(iter_docs([corpus]))
    assert len(docs) == 50
    holdout = FileHoldout(0.2)
    for doc in docs:
        n = len(doc.text.encode("utf-8"))
        split = "val" if holdout.assign(doc.file, n) else "train"
        expected[split].append((tok.encode(doc.text, add_special_tokens=False).ids + [0], n))
    assert len(expected["val"]) == 10  # every 5th document
    assert index["files"] == holdout.files and index["files"][str(corpus / "zh.jsonl")]["val_docs"] == 6
    for split in ("train", "val"):
        got = _read_split(out, index, split)
        assert got.tolist() == [t for ids, _ in expected[split] for t in ids]
        entries = index["splits"][split]
        assert sum(e["num_docs"] for e in entries) == len(expected[split]) == int((got == 0).sum())
        assert sum(e["num_bytes"] for e in entries) == sum(n for _, n in expected[split])
        assert split_num_tokens(index, split) == got.size
    assert index["tokenizer_hash"] == tokenizer_hash(tok_dir) and index["eot_id"] == 0
    assert index["tokenizer_dir"] == str(tok_dir.resolve()) and index["dtype"] == "uint16"
    assert load_index(out, expected_tokenizer_hash=tokenizer_hash(tok_dir)) == index
    assert "bytes/token" in format_summary(index, out, 1.0)


def test_same_output_for_1_and_2_workers_and_small_shards(setup, tmp_path, monkeypatch):
    from lmforge.data import tokenize_cmd

    monkeypatch.setattr(tokenize_cmd, "CHUNK_BYTES", 8000)  # many chunks, so both workers get some
    _, corpus, tok_dir = setup
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_corpus([corpus], tok_dir, out, val_fraction=0.1, workers=workers, shard_tokens=3000, progress=False)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    assert sum(f.startswith("train_") for f in files) > 3  # --shard-tokens 3000 cuts several shards
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    for name in files:
        if name.endswith(".bin"):
            tokens = open_shard(outs[0] / name)
            assert tokens[-1] == 0  # shards end on a document boundary


def test_small_corpus_still_gets_a_val_doc_and_special_text_is_plain(setup, tmp_path):
    _, _, tok_dir = setup
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"text": "First doc <|endoftext|> with a literal marker."}) + "\n"
                    + json.dumps({"text": "Second doc."}) + "\n")  # fmt: skip
    index = tokenize_corpus([data], tok_dir, tmp_path / "out", val_fraction=0.001, workers=1, progress=False)
    train, val = (_read_split(tmp_path / "out", index, s) for s in ("train", "val"))
    assert (train == 0).sum() == 1 and (val == 0).sum() == 1  # one EOT each: the literal marker is plain text
    assert [e["num_docs"] for e in index["splits"]["val"]] == [1]


def test_index_errors(setup, tmp_path):
    _, corpus, tok_dir = setup
    out = tmp_path / "data"
    with pytest.raises(LmforgeError, match="index.json: no shard index"):
        load_index(out)
    tokenize_corpus([corpus / "00_00.txt", corpus / "00_01.txt"], tok_dir, out, workers=1, progress=False)
    h = tokenizer_hash(tok_dir)
    with pytest.raises(LmforgeError, match=f"shards in .*data were made with tokenizer {h}, but this run uses 0123"):
        load_index(out, expected_tokenizer_hash="0123")
    (out / "index.json").write_text('{"version": 1, "splits": ')
    with pytest.raises(LmforgeError, match="index.json: corrupt shard index"):
        load_index(out)


def test_rerun_replaces_stale_shards(setup, tmp_path):
    _, corpus, tok_dir = setup
    out = tmp_path / "data"
    tokenize_corpus([corpus], tok_dir, out, shard_tokens=2000, workers=1, progress=False)
    index = tokenize_corpus([corpus / "00_00.txt"], tok_dir, out, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train_000000.bin"]
    assert index["splits"] == load_index(out)["splits"] and index["splits"]["val"] == []


def test_readers_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["a", "", "b"]))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "d" / "2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": ["p0", "p1"], "n": [1, 2]}), tmp_path / "3.parquet")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "4.txt").write_text("\ufeffwhole file")
    (tmp_path / "d" / ".hidden.txt").write_text("skipped")
    got = [(t, s.replace(str(tmp_path), "")) for t, s in iter_texts([tmp_path / "d"])]
    assert got == [("a", "/d/1.jsonl.gz:1"), ("b", "/d/1.jsonl.gz:3"), ("a", "/d/2.jsonl.zst:1"),
                   ("b", "/d/2.jsonl.zst:3"), ("whole file", "/d/sub/4.txt:1")]  # fmt: skip
    assert [t for t, _ in iter_texts([tmp_path / "3.parquet"], text_field="body")] == ["p0", "p1"]
    with pytest.raises(LmforgeError, match="3.parquet: column 'n' is int64, not a string column"):
        list(iter_texts([tmp_path / "3.parquet"], text_field="n"))
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(lines.encode())[:-10])
    with pytest.raises(LmforgeError, match="bad.jsonl.gz:3: cannot read further: truncated"):
        list(iter_texts([tmp_path / "bad.jsonl.gz"]))


def test_cli_data_tokenize(setup, tmp_path, monkeypatch, capsys):
    from lmforge import cli
    from lmforge.data import tokenize_cmd
    from lmforge.tokenizer import cli as tokenizer_cli

    monkeypatch.setattr(cli, "_command_modules", lambda: [tokenizer_cli, tokenize_cmd])
    _, corpus, tok_dir = setup
    argv = ["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "val: " in out and "bytes/token" in out
    assert cli.main([*argv[:3], str(tmp_path / "missing"), *argv[4:]]) == 2
    assert capsys.readouterr().err.strip().endswith("missing: no such file or folder")
