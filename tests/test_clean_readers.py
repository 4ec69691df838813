"""`lmforge data clean` readers for WARC files (warcio) and Hugging Face datasets (`hf:`): documents with their
metadata, damage counted with file and offset, input = kept + rejected + unreadable. Nothing is downloaded: the
WARCs are written here with warcio's WARCWriter, the datasets with `save_to_disk` or as local JSONL folders."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from lmforge.data.clean.pipeline import clean_corpus
from lmforge.data.readers import HfSource, list_inputs, read_file
from lmforge.errors import LmforgeError

STEPS = [{"name": "extract_html"}, {"name": "normalize"}, {"name": "gopher_quality", "min_words": 20}]
ZH = "这条河在夜里慢慢上涨，到了早上，低处的田地已经被水淹没了。在山谷里生活了几十年的农民说，他们从来没有见过这样的情况。"


def _passages(n: int) -> list[str]:
    from lmforge.run import shakespeare_files

    lines = [ln for ln in shakespeare_files()[2].read_text(encoding="utf-8").splitlines() if ln.strip()]
    return ["\n".join(lines[i * 25 : (i + 1) * 25]) for i in range(n)]


def _page(title: str, body: str) -> bytes:
    paras = "".join(f"<p>{p}</p>" for p in body.split("\n"))
    return (
        f"<html><head><meta charset='utf-8'><title>{title}</title></head><body><nav>Home | About</nav>"
        f"<article><h1>{title}</h1>{paras}</article><footer>Copyright</footer></body></html>"
    ).encode()


def write_warc(path: Path, gz: bool, pages: list[tuple[str, str, bytes]], extra: bool = True) -> list[int]:
    """A WARC like a crawler writes: warcinfo, then a request + response per page (url, content type, payload),
    and with `extra` the records that hold no document. Returns each record's offset."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    offsets = []

    def put(record):
        offsets.append(buf.tell())
        w.write_record(record)

    put(w.create_warcinfo_record(path.name, {"software": "lmforge-test"}))

    def response(url: str, status: str, ctype: str, payload: bytes):
        http = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
        return w.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=http)

    for url, ctype, payload in pages:
        get = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")], is_http_request=True)
        put(w.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=get))
        put(response(url, "200 OK", ctype, payload))
    if extra:
        put(response("http://example.org/missing", "404 Not Found", "text/html", b"<html>Not found</html>"))
        put(response("http://example.org/logo.png", "200 OK", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)))
        put(w.create_warc_record("http://example.org/a", "metadata", payload=io.BytesIO(b"via: test\r\n")))
    path.write_bytes(buf.getvalue())
    return offsets


@pytest.fixture
def pages() -> list[tuple[str, str, bytes]]:
    texts = _passages(4)
    return [
        ("http://example.org/1", "text/html; charset=utf-8", _page("First & best", texts[0])),
        ("http://example.org/2", "text/html", _page("Second", texts[1])),
        ("http://example.org/3.txt", "text/plain; charset=utf-8", texts[2].encode()),
        ("http://example.org/zh", "text/html; charset=gbk", _page("中文页面", ZH * 3).decode().encode("gbk")),
    ]


@pytest.mark.parametrize("gz", [True, False])
def test_warc_documents_and_metadata(tmp_path, pages, gz):
    path = tmp_path / ("a.warc.gz" if gz else "a.warc")
    offsets = write_warc(path, gz, pages)
    bad = []
    docs = list(read_file(path, bad))
    assert bad == [] and [d.metadata["url"] for d in docs] == [u for u, _, _ in pages]  # 404, PNG, request: skipped
    first, second, plain, zh = docs
    assert first.metadata["title"] == "First & best" and "<article>" in first.metadata["html"] and first.text == ""
    assert second.metadata["title"] == "Second" and second.source.endswith(f"@{offsets[4]}")
    assert plain.text == pages[2][2].decode() and "html" not in plain.metadata
    assert "中文页面" in zh.metadata["html"] and zh.metadata["title"] == "中文页面"  # decoded from GBK
    assert first.id.startswith("<urn:uuid:") and first.metadata["date"]
    assert first.source == f"{path}@{offsets[2]}" and first.file == str(path)


def test_wet_conversion_records(tmp_path):
    """Common Crawl's WET files: the extracted text as `conversion` records (text/plain)."""
    from warcio.warcwriter import WARCWriter

    text = _passages(1)[0]
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    w.write_record(w.create_warc_record("http://example.org/t", "conversion", payload=io.BytesIO(text.encode()),
                                        warc_content_type="text/plain"))  # fmt: skip
    (tmp_path / "x.warc.wet.gz").write_bytes(buf.getvalue())
    bad = []
    (doc,) = read_file(tmp_path / "x.warc.wet.gz", bad)
    assert bad == [] and doc.text == text and doc.metadata["url"] == "http://example.org/t"


def test_warc_damage_is_counted_with_offset(tmp_path, pages):
    good = tmp_path / "good.warc.gz"
    write_warc(good, True, pages)
    data = good.read_bytes()
    cut = tmp_path / "cut.warc.gz"  # truncated inside the last page's response
    offsets = write_warc(cut, True, pages, extra=False)
    cut.write_bytes(cut.read_bytes()[: offsets[-1] + 200])
    bad = []
    assert len(list(read_file(cut, bad))) == 3
    assert len(bad) == 1 and bad[0].offset == offsets[-1] and "truncated" in bad[0].why

    corrupt = tmp_path / "corrupt.warc"  # the second page's response header garbled: reading resumes after it
    offsets = write_warc(corrupt, False, pages, extra=False)
    raw = bytearray(corrupt.read_bytes())
    raw[offsets[4] : offsets[4] + 8] = b"GARBAGE!"
    corrupt.write_bytes(bytes(raw))
    bad = []
    docs = list(read_file(corrupt, bad))
    assert [d.metadata["url"] for d in docs] == [pages[0][0], pages[2][0], pages[3][0]]
    assert len(bad) == 1 and bad[0].offset == offsets[4] and "corrupt record" in bad[0].why
    assert bad[0].to_record()["offset"] == offsets[4] and f"byte {offsets[4]}" in bad[0].why

    empty = tmp_path / "empty.warc"
    empty.write_bytes(b"")
    (tmp_path / "junk.warc.gz").write_bytes(data[:40])  # a gzip header and nothing whole after it
    report = clean_corpus([tmp_path], tmp_path / "out", steps=STEPS, workers=1, progress=False)
    c = report["counts"]
    assert report["identity_holds"] and c["input"] == c["kept"] + c["rejected"] + c["unreadable"]
    per_file = {Path(f).name: n for f, n in report["per_file"].items()}
    assert per_file["good.warc.gz"] == {"input": 4, "kept": 4, "rejected": 0, "unreadable": 0}
    assert per_file["cut.warc.gz"]["unreadable"] == 1 and per_file["corrupt.warc"]["input"] == 4
    assert per_file["empty.warc"] == {"input": 1, "kept": 0, "rejected": 0, "unreadable": 1}
    assert per_file["junk.warc.gz"]["unreadable"] == 1
    kept = [json.loads(line) for line in (tmp_path / "out/kept/part-00000.jsonl").read_text().splitlines()]
    page = next(r for r in kept if r["metadata"]["url"] == "http://example.org/1" and "good" in r["source"])
    assert "Home" not in page["text"] and "Copyright" not in page["text"] and "html" not in page["metadata"]
    assert page["metadata"]["title"] == "First & best"
    assert any(ZH[:10] in r["text"] for r in kept)


def test_warc_never_yields_a_damaged_document(tmp_path, pages):
    """Cut the file anywhere: each document read is whole, and a missing one is counted unless the cut falls
    between records (where a shorter file is a valid WARC)."""
    for gz in (True, False):
        full = tmp_path / ("full.warc.gz" if gz else "full.warc")
        offsets = write_warc(full, gz, pages, extra=False)
        data = full.read_bytes()
        want = {d.id: d.metadata["html"] if d.text == "" else d.text for d in read_file(full, [])}
        path = tmp_path / ("cut.warc.gz" if gz else "cut.warc")
        for cut in range(1, len(data), 11):
            path.write_bytes(data[:cut])
            bad = []
            docs = list(read_file(path, bad))
            assert all((d.metadata.get("html") if d.text == "" else d.text) == want[d.id] for d in docs), cut
            if len(docs) < len(want) and not bad:  # only at a record's end (in a plain WARC: or its blank lines)
                assert any(o - (0 if gz else 4) <= cut <= o for o in offsets), cut


DEBIAN = Path(os.environ.get("LMFORGE_DEBIAN_REFERENCE", "/usr/share/debian-reference"))


@pytest.mark.skipif(
    not (list(DEBIAN.glob("ch0*.en.html")) and list(DEBIAN.glob("ch0*.zh-cn.html"))),
    reason="Debian Reference pages absent (apt-get download debian-reference-en debian-reference-zh-cn, "
    "dpkg-deb -x each into a folder, LMFORGE_DEBIAN_REFERENCE=folder/usr/share/debian-reference)",
)
def test_warc_of_real_pages_english_and_chinese(tmp_path):
    files = sorted(DEBIAN.glob("ch0[1-4].en.html")) + sorted(DEBIAN.glob("ch0[1-4].zh-cn.html"))
    pages = [(f"https://www.debian.org/doc/manuals/debian-reference/{f.name}", "text/html", f.read_bytes())
             for f in files]  # fmt: skip
    (tmp_path / "raw").mkdir()
    write_warc(tmp_path / "raw" / "crawl.warc.gz", True, pages)
    steps = [*STEPS, {"name": "language", "languages": ["en", "zh"]}, {"name": "substring_dedup", "min_bytes": 100}]
    report = clean_corpus([tmp_path / "raw"], tmp_path / "out", steps=steps, workers=1, progress=False)
    assert report["identity_holds"] and report["counts"]["input"] == len(files)
    kept = [json.loads(line) for line in (tmp_path / "out/kept/part-00000.jsonl").read_text().splitlines()]
    assert {r["metadata"]["language"] for r in kept} == {"en", "zh"} and len(kept) == len(files)
    assert all(r["metadata"]["title"] and r["metadata"]["url"].endswith(".html") for r in kept)
    zh = [r["text"] for r in kept if r["metadata"]["language"] == "zh"]
    assert sum(len(t) for t in zh) > 10_000 and all("\ufffd" not in t for t in zh)


# --- Hugging Face datasets (local only) ---


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub access and a private cache: a test that tried to download would fail, not fetch."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    return datasets


def test_hf_saved_dataset_through_the_pipeline(offline, tmp_path):
    import datetime

    texts = _passages(5)
    ds = offline.Dataset.from_dict({
        "text": [texts[0], None, texts[1], "too short", texts[0], "\x00binary"],
        "id": ["a", "b", "c", "d", "e", "f"],
        "url": [f"http://example.org/{i}" for i in range(6)],
        "crawled": [datetime.datetime(2024, 1, i + 1) for i in range(6)],
    })  # fmt: skip
    ds.save_to_disk(str(tmp_path / "saved"))
    steps = [*STEPS, {"name": "exact_dedup"}]
    for spec in (f"hf:{tmp_path / 'saved'}", str(tmp_path / "saved")):  # the prefix is optional for a saved folder
        out = tmp_path / ("o1" if spec.startswith("hf:") else "o2")
        report = clean_corpus([spec], out, steps=steps, workers=1, progress=False)
        c = report["counts"]
        assert (c["input"], c["kept"], c["rejected"], c["unreadable"]) == (6, 2, 2, 2) and report["identity_holds"]
        assert report["per_file"] == {
            f"hf:{tmp_path / 'saved'}": {"input": 6, "kept": 2, "rejected": 2, "unreadable": 2}
        }
        why = {u["line"]: u["why"] for u in report["unreadable"]}
        assert why == {2: "record has no 'text' field", 6: "binary data (NUL characters)"}
        kept = [json.loads(line) for line in (out / "kept/part-00000.jsonl").read_text().splitlines()]
        assert [r["id"] for r in kept] == ["a", "c"] and kept[0]["metadata"]["url"] == "http://example.org/0"
        assert kept[0]["metadata"]["crawled"].startswith("2024-01-01") and kept[0]["source"].endswith(":1")
    assert (tmp_path / "o1/kept/part-00000.jsonl").read_bytes() == (tmp_path / "o2/kept/part-00000.jsonl").read_bytes()


def test_hf_local_json_folder_and_splits(offline, tmp_path):
    texts = _passages(3)
    folder = tmp_path / "jsonds"
    folder.mkdir()
    rows = [{"content": t, "url": f"http://example.org/{i}"} for i, t in enumerate(texts)] + [{"content": "x"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert offline.load_dataset("json", data_files=str(folder / "train.jsonl"), split="train").num_rows == 4
    bad = []
    src = list_inputs([f"hf:{folder}"])[0]
    docs = list(read_file(src, bad, text_field="content"))
    assert isinstance(src, HfSource) and [d.text for d in docs] == texts + ["x"] and bad == []
    assert "url" not in docs[-1].metadata  # the streamed dataset's null fill is left out
    report = clean_corpus([f"hf:{folder}:train"], tmp_path / "o", steps=STEPS, workers=1, progress=False,
                          text_field="content")  # fmt: skip
    assert report["counts"] == {"input": 4, "kept": 3, "rejected": 1, "unreadable": 0} and report["identity_holds"]

    dd = offline.DatasetDict({
        "train": offline.Dataset.from_dict({"text": texts[:2]}),
        "test": offline.Dataset.from_dict({"text": texts[2:]}),
    })  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in read_file(list_inputs([f"hf:{tmp_path / 'dd'}:test"])[0], [])] == texts[2:]
    assert [d.text for d in read_file(list_inputs([f"hf:{tmp_path / 'dd'}"])[0], [])] == texts[:2]  # train


def test_hf_errors_are_one_line(offline, tmp_path):
    offline.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(LmforgeError, match="no column 'text' \\(columns: body\\); choose one with --text-field"):
        list(read_file(list_inputs([f"hf:{tmp_path / 'saved'}"])[0], []))
    with pytest.raises(LmforgeError, match="no such dataset folder"):
        list_inputs([f"hf:{tmp_path / 'missing'}"])
    with pytest.raises(LmforgeError, match="single split"):
        list(read_file(list_inputs([f"hf:{tmp_path / 'saved'}:test"])[0], [], text_field="body"))
    offline.DatasetDict({"a": offline.Dataset.from_dict({"text": ["x"]}), "b": offline.Dataset.from_dict(
        {"text": ["y"]})}).save_to_disk(str(tmp_path / "two"))  # fmt: skip
    with pytest.raises(LmforgeError, match="several splits \\(a, b\\); name one"):
        list(read_file(list_inputs([f"hf:{tmp_path / 'two'}"])[0], []))
    with pytest.raises(LmforgeError, match="no split 'c'"):
        list(read_file(list_inputs([f"hf:{tmp_path / 'two'}:c"])[0], []))
