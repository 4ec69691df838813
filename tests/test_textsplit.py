"""A plain-text file is a stream of documents (`lmforge/data/textsplit.py`), and held-out / validation documents
are a share of each input file (`lmforge/data/holdout.py`).  Run: pytest tests/test_textsplit.py"""

from __future__ import annotations

import pytest

from lmforge.data.holdout import FileHoldout
from lmforge.data.readers import iter_docs, read_file
from lmforge.data.textsplit import SplitStats, TextSplit, nbytes, split_text
from lmforge.errors import LmforgeError


def _docs(text: str, **kw) -> list[str]:
    return [p.text for p in split_text(text, TextSplit(**kw))]


def test_paragraphs_grouped_up_to_doc_bytes_exact_slices():
    paras = [f"Paragraph {i} " + "word " * 20 for i in range(10)]  # ~113 bytes each
    text = "\n\n".join(paras) + "\n"
    docs = _docs(text, doc_bytes=300)
    assert docs == ["\n\n".join(paras[i : i + 2]) for i in range(0, 10, 2)]  # two fit in 300 bytes, three do not
    assert all(nbytes(d) <= 300 for d in docs)
    assert _docs(text, doc_bytes=64 << 10) == [text.rstrip("\n")]  # a small file is one document
    # Blank lines with spaces or tabs, and several of them, separate paragraphs too; text inside is kept as is.
    assert _docs("a\n \t\n\n\nb\nc", doc_bytes=64) == ["a\n \t\n\n\nb\nc"]
    assert _docs("a" * 40 + "\n \t\n\n\n" + "b" * 40, doc_bytes=64) == ["a" * 40, "b" * 40]


def test_lines_of_a_paragraph_grouped_and_long_lines_cut_with_count():
    # Chinese text often has one paragraph per line and no blank lines: cut at line boundaries.
    lines = [f"第{i}段文字，内容是中文。" for i in range(200)]
    text = "\n".join(lines)
    docs = _docs(text, doc_bytes=1000)
    assert len(docs) > 5 and all(nbytes(d) <= 1000 for d in docs)
    assert "\n".join(docs) == text  # cut only at newlines, nothing lost
    # One huge line with no newline (a 200 MB line, here 200 kB): cut at spaces, counted.
    stats = SplitStats()
    line = "word " * 40_000
    pieces = [p.text for p in split_text(line, TextSplit(doc_bytes=4096), stats)]
    assert "".join(pieces) == line.rstrip() or "".join(pieces) == line
    assert all(nbytes(p) <= 4096 for p in pieces) and all(p.endswith(" ") for p in pieces[:-1])
    assert stats.cut_lines == 1 and stats.docs == len(pieces)
    # No space at all: cut at the limit on a character boundary (3-byte characters never split).
    pieces = _docs("汉" * 5000, doc_bytes=1000)
    assert "".join(pieces) == "汉" * 5000 and all(nbytes(p) <= 1000 for p in pieces)


def test_doc_sep_and_its_warnings(tmp_path, capsys):
    text = "first doc\n<|endoftext|>\nsecond\nline\n<|endoftext|>  \n<|endoftext|>third"
    pieces = list(split_text(text, TextSplit(doc_sep="<|endoftext|>")))
    assert [(p.line, p.text) for p in pieces] == [(1, "first doc"), (3, "second\nline"), (6, "third")]
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo\n")
    docs = list(iter_docs([path], split=TextSplit(doc_sep="<|endoftext|>")))
    assert [d.text for d in docs] == ["one\n\ntwo"] and docs[0].source == f"{path}:1" and docs[0].file == str(path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: --doc-sep '<|endoftext|>' never occurs" in err
    path.write_text("x" * 5000)
    docs = list(iter_docs([path], split=TextSplit(doc_bytes=1024)))
    assert len(docs) == 5 and "1 line(s) longer than 1,024 bytes cut inside the line" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="--doc-bytes must be at least 64"):
        TextSplit(doc_bytes=10)
    with pytest.raises(LmforgeError, match="--doc-sep must not be empty"):
        TextSplit(doc_sep="")


def test_clean_reader_splits_txt_like_the_strict_reader(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Chapter {i}\n" + "Some words here. " * 30 for i in range(20)), encoding="utf-8")
    split = TextSplit(doc_bytes=2000)
    strict = list(iter_docs([path], split=split))
    bad = []
    forgiving = list(read_file(path, bad, split=split))
    assert not bad and len(strict) > 3
    assert [d.text for d in forgiving] == [d.text for d in strict]
    assert [d.source for d in forgiving] == [d.source for d in strict]
    assert forgiving[1].id == f"book.txt:{strict[1].source.rsplit(':', 1)[1]}"


def test_non_utf8_file_names_its_likely_encoding(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_bytes("中文的文本，这是一个用国标码保存的文件。".encode("gb18030"))
    with pytest.raises(LmforgeError, match=r"zh.txt: not valid UTF-8 .*looks like GB18030.*iconv -f GB18030 -t UTF-8"):
        list(iter_docs([path]))
    bad = []
    assert list(read_file(path, bad)) == [] and "looks like GB18030" in bad[0].why


def test_holdout_is_a_share_of_every_file():
    h = FileHoldout(0.05)
    for file, n in (("en.txt", 200), ("zh.txt", 100), ("tiny.txt", 3)):
        for _ in range(n):
            h.assign(file, 10)
    assert {f: c["val_docs"] for f, c in h.files.items()} == {"en.txt": 10, "zh.txt": 5, "tiny.txt": 0}
    assert h.whole_files(held=True) == [] and h.totals()["train_docs"] == 288
    # A folder of one-document files gives the same share, by file.
    h = FileHoldout(0.1)
    held = [h.assign(f"{i}.txt", 1) for i in range(100)]
    assert sum(held) == 10 and held.index(True) == 4  # every 10th, the first 5 in
    with pytest.raises(LmforgeError, match=r"--val-fraction must be in \[0, 1\), got 1"):
        FileHoldout(1)


def test_data_clean_takes_the_split_flags_and_config(tmp_path):
    from lmforge.cli import main

    path = tmp_path / "book.txt"
    path.write_text("<|endoftext|>".join(f"Story {i}. " + "Words and more words. " * 40 for i in range(12)))
    out = tmp_path / "clean"
    assert main(["data", "clean", "--input", str(path), "--out", str(out), "--steps", "normalize", "--workers", "1",
                 "--doc-sep", "<|endoftext|>"]) == 0  # fmt: skip
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["input"] == 12 and report["counts"]["kept"] == 12
    cfg = tmp_path / "clean.yaml"
    cfg.write_text("steps: [{name: normalize}]\ndoc_bytes: 2000\n")
    assert main(["data", "clean", "--input", str(path), "--out", str(tmp_path / "c2"), "--config", str(cfg),
                 "--workers", "1"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "c2" / "report.json").read_text())["counts"]["input"] == 6  # 10.8 kB cut at 2 kB
