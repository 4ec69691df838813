"""One reader registry: every command that takes input reads the same formats, with the same messages.

python -m pytest -q tests/test_readers_registry.py
"""

from __future__ import annotations

import json

import pytest

from lmforge.data.readers import Strict, Unreadable, iter_docs, read_documents
from lmforge.errors import LmforgeError
from tests.test_clean_readers import _page, _passages, write_warc


@pytest.fixture
def corpus(tmp_path):
    """The same passages in every document format the registry reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _passages(6)
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(texts[0], encoding="utf-8")
    (d / "b.jsonl").write_text(json.dumps({"text": texts[1], "id": "b1"}) + "\n", encoding="utf-8")
    (d / "c.json").write_text(json.dumps([{"text": texts[2]}]), encoding="utf-8")
    pq.write_table(pa.table({"text": [texts[3]], "lang": ["en"]}), d / "d.parquet")
    (d / "e.html").write_bytes(_page("Five", texts[4]))
    write_warc(d / "f.warc.gz", True, [("http://example.org/6", "text/html", _page("Six", texts[5]))])
    (d / "notes.md").write_text("not an input format\n")
    return d, texts


def _words(text: str) -> set[str]:
    return set(text.split())


def test_strict_and_forgiving_readers_take_every_format(corpus, capsys):
    d, texts = corpus
    files = [d / name for name in ("a.txt", "b.jsonl", "c.json", "d.parquet", "e.html", "f.warc.gz")]
    docs = list(iter_docs(files))  # strict (tokenize, tokenizer train, train-quality, mix): pages extracted
    assert [doc.file for doc in docs] == [str(f) for f in files]
    for doc, text in zip(docs, texts, strict=True):
        assert _words(text) <= _words(doc.text) | {"<p>"}, doc.source  # a page's main text, without its menus
    assert "Home" not in docs[4].text and "Copyright" not in docs[5].text
    bad: list[Unreadable] = []
    forgiving = list(read_documents(files, bad))  # data clean: the raw page waits for extract_html
    assert not bad and [d_.source for d_ in forgiving] == [d_.source for d_ in docs]
    assert forgiving[4].text == "" and "<article>" in forgiving[4].metadata["html"]
    assert forgiving[3].metadata == {"lang": "en"} and forgiving[1].id == "b1"
    # A folder: the .json file is read only when named (a folder's .json files are reports and indexes), and a
    # file no reader takes is skipped with a note (strict) or reported unreadable (forgiving).
    strict = list(iter_docs([d]))
    assert len(strict) == 5 and "skipped 1 file(s) of a type no reader takes (e.g. notes.md)" in capsys.readouterr().err
    bad = []
    assert len(list(read_documents([d], bad))) == 5
    assert [(u.file.endswith("notes.md"), u.reason) for u in bad] == [(True, "unsupported file type")]


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "bad.jsonl:2: not valid JSON (Expecting property name"),
        ("nofield.jsonl", b'{"body": "x"}\n', "nofield.jsonl:1: record has no 'text' field"),
        ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "latin1.txt: not valid UTF-8 (byte 0xe9 at offset 3)"),
        ("empty.jsonl", b"\n\n", "empty.jsonl: empty file"),
        ("list.json", b'{"text": "x"}', "list.json: JSON file is not a list of records"),
    ],
)
def test_a_bad_input_is_the_same_message_strict_or_forgiving(tmp_path, name, data, why):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(LmforgeError) as e:
        list(iter_docs([path]))
    assert str(e.value).startswith(f"{tmp_path}/{why}")
    bad: list[Unreadable] = []
    list(read_documents([path], bad))
    assert [u.message() for u in bad] == [str(e.value)]


def test_strict_is_a_bad_list_that_raises():
    with pytest.raises(LmforgeError, match="^f.jsonl:3: why$"):
        Strict().append(Unreadable("f.jsonl", 3, "why"))
    allowed = Strict(allow=("empty file",))
    allowed.append(Unreadable("e.jsonl", None, "empty file", "empty file"))  # passes: nothing to read
    assert allowed == []
    with pytest.raises(LmforgeError, match="^e.jsonl:1: bad$"):
        allowed.append(Unreadable("e.jsonl", 1, "bad", "malformed JSON"))


def test_chat_stages_read_parquet_through_the_registry(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.chat.datasets import load_conversations

    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    cs = load_conversations(str(tmp_path / "chats.parquet"))
    assert cs.format == "alpaca" and len(cs.conversations) == 3 and cs.skipped == {}
    assert cs.conversations[2] == [{"role": "user", "content": "say 2"}, {"role": "assistant", "content": "2"}]
