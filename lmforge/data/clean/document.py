"""Documents and forgiving readers for `lmforge data clean`.

    from lmforge.data.clean.document import read_documents, Unreadable
    bad: list[Unreadable] = []
    for doc in read_documents(["raw/"], bad, text_field="text", id_field="id"):
        ...

Unlike `lmforge.data.readers` (strict: the first bad line is an error), a cleaning run meets web
data, so a bad record is skipped and appended to `bad` with its file, line and why: an invalid
JSON line, a record without the text field, bytes that are not UTF-8, a truncated `.gz`/`.zst`
(the lines before the cut are kept), an empty file, a file of an unsupported type inside a folder.
Every record a file holds ends up either as a `Document` or as one `Unreadable` entry.

Inputs: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one document per non-blank line; the text in
`text_field`, the id in `id_field`, else `file:line`; the other fields go to `metadata`),
`.txt` (a stream of documents, split as `lmforge.data.textsplit` says: blank-line paragraphs grouped
up to 16 KiB, or `doc_sep`; id = `name:line`, source = `file:line`) and `.html`/`.htm` (one document
per file, id = the file name; the raw page is `metadata["html"]` and `text` stays empty until the
`extract_html` step).

`.warc`, `.warc.gz`, `.warc.wet.gz` (warcio): one document per 2xx `response` (or `resource`,
`conversion`) record whose type is HTML (-> `metadata["html"]`, like an `.html` file) or plain text
(-> `text`); id = WARC-Record-ID, source = `file@byte_offset`, `metadata` gets `url`, `date` and the
page's `title`. Records that hold no document (warcinfo, request, metadata, revisit, redirects and
errors, images and other non-text payloads) are skipped silently: they are not input records. A
corrupt record, a truncated one, a payload that cannot be decoded (charset from the HTTP header or
a `<meta charset>`, else UTF-8) is one `Unreadable` entry with its byte `offset`; reading goes on
at the next record found (the next gzip member, or the next `WARC/1.` line).

A record larger than `max_record_bytes` (default `MAX_RECORD_BYTES`, 16 MiB: far above any real
document; a 100 MB single-line JSONL record or text file is junk, and would cost gigabytes in the steps)
is one `Unreadable` entry with its size, and is never held in memory whole: a JSONL line is read
through in blocks, an `.html` file is judged by its size, a WARC payload by its first bytes. A `.txt`
file is read whole and split into documents of at most `doc_bytes` (`max_doc_bytes` with `doc_sep`),
cutting over-long lines with a warning, so no limit applies to the file.

`hf:NAME_OR_PATH[:SPLIT]` (the `datasets` library, `pip install 'lmforge[hf]'`): a folder written
by `save_to_disk` (also recognised without the `hf:` prefix), a local script-free dataset folder
(JSONL/Parquet/CSV files), or a Hub dataset name, streamed; SPLIT defaults to `train` or the only
split. One document per row, fields as for JSONL; `line` counts rows from 1, source = `hf:...:row`.
A dataset that cannot be opened, or has no `text_field` column, is an `LmforgeError`.
"""

from __future__ import annotations

import contextlib
import html as htmllib
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.readers import guess_encoding, open_jsonl, parse_jsonl_line, stream_errors
from lmforge.data.textsplit import TextSplit, split_file_text
from lmforge.errors import LmforgeError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
HTML_SUFFIXES = (".html", ".htm")
WARC_SUFFIXES = (".warc", ".warc.gz", ".warc.wet.gz")
SUFFIXES = (*JSONL_SUFFIXES, ".txt", *HTML_SUFFIXES, *WARC_SUFFIXES)
MAX_RECORD_BYTES = 16 << 20  # the default `max_record_bytes`: a JSONL line, a text/HTML file, a WARC payload


@dataclass
class Document:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    source: str = ""  # file:line (JSONL) or file
    file: str = ""  # the input file, for per-file counts (not written out: `source` names it)

    def to_record(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "metadata": self.metadata}


@dataclass
class Unreadable:
    file: str
    line: int | None  # None when the whole file is unreadable (or for a WARC record: see offset)
    why: str
    offset: int | None = None  # byte offset of a WARC record

    def to_record(self) -> dict:
        record = {"file": self.file, "line": self.line, "why": self.why}
        if self.offset is not None:
            record["offset"] = self.offset
        return record


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face dataset input, `hf:NAME_OR_PATH[:SPLIT]`; `str()` is the spec (its name in the report)."""

    spec: str
    name: str
    split: str | None = None

    def __str__(self) -> str:
        return self.spec


HF_SPEC = re.compile(r"hf:(?P<name>.+?)(?::(?P<split>[A-Za-z_][\w.-]*))?")


def parse_hf(spec: str) -> HfSource:
    """`hf:NAME_OR_PATH[:SPLIT]` as an `HfSource`; a local-looking path that does not exist is an `LmforgeError`."""
    m = HF_SPEC.fullmatch(spec)
    if m is None:
        raise LmforgeError(f"{spec}: expected hf:NAME_OR_PATH[:SPLIT]")
    name, split = m["name"], m["split"]
    if split and Path(f"{name}:{split}").expanduser().exists():  # a local path that has a colon in it
        name, split = f"{name}:{split}", None
    local = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not local.is_dir():
        raise LmforgeError(f"{spec}: no such dataset folder {local}")
    return HfSource(spec, name, split)


def _saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def list_inputs(paths: Iterable[str | Path]) -> list[Path | HfSource]:
    """The files named by `paths` (files, or folders walked recursively, hidden files skipped), sorted per folder,
    and the datasets named `hf:...` (or folders written by `save_to_disk`) as `HfSource`s.

    A missing path is an `LmforgeError`; a file of an unknown type is listed and later reported unreadable.
    """
    paths = list(paths)
    files: list[Path | HfSource] = []
    for spec in paths:
        if isinstance(spec, str) and spec.startswith("hf:"):
            files.append(parse_hf(spec))
            continue
        p = Path(spec)
        if p.is_dir() and _saved_dataset(p):
            files.append(HfSource(f"hf:{p}", str(p)))
        elif p.is_dir():
            files.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
                )
            )
        elif p.is_file():
            files.append(p)
        else:
            raise LmforgeError(f"{p}: no such file or folder")
    if not files:
        raise LmforgeError(f"{', '.join(map(str, paths))}: no input files")
    return files


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _too_large(size: int, limit: int) -> str:
    return f"record too large ({size:,} bytes; max_record_bytes is {limit:,})"


def _not_utf8(data: bytes) -> str:
    enc = guess_encoding(data)
    return "binary data (not UTF-8 text)" if enc is None else f"not UTF-8 (it looks like {enc.upper()}: convert it)"


def _read_whole(path: Path, kind: str, bad: list[Unreadable], limit: int, split: TextSplit) -> Iterator[Document]:
    size = path.stat().st_size
    if size > limit and kind != ".txt":
        bad.append(Unreadable(str(path), None, _too_large(size, limit)))
        return
    data = path.read_bytes()
    if not data.strip():
        bad.append(Unreadable(str(path), None, "empty file"))
        return
    text = _decode(data)
    if text is None or "\x00" in text:
        bad.append(Unreadable(str(path), None, _not_utf8(data) if text is None else "binary data (not UTF-8 text)"))
        return
    del data
    text = text.removeprefix("\ufeff")
    if kind != ".txt":
        yield Document(id=path.name, text="", metadata={"html": text}, source=str(path), file=str(path))
        return
    for piece in split_file_text(text, split, str(path)):
        yield Document(id=f"{path.name}:{piece.line}", text=piece.text, metadata={}, source=f"{path}:{piece.line}",
                       file=str(path))  # fmt: skip


def _bounded_lines(f, limit: int) -> Iterator[bytes | int]:
    """The lines of binary file `f`; in place of a line longer than `limit` bytes (its newline not counted), its
    length, found by reading it through in blocks of at most 1 MiB, so such a line never sits in memory whole."""
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        size = len(raw)
        while (block := f.readline(1 << 20)) and not block.endswith(b"\n"):
            size += len(block)
        yield size + len(block.rstrip(b"\n"))


def _read_jsonl(path: Path, text_field: str, id_field: str, bad: list[Unreadable], limit: int) -> Iterator[Document]:
    nonblank, lineno = 0, 0
    try:
        with open_jsonl(path) as f:
            for lineno, raw in enumerate(_bounded_lines(f, limit), start=1):
                if isinstance(raw, int):
                    nonblank += 1
                    bad.append(Unreadable(str(path), lineno, _too_large(raw, limit)))
                    continue
                if not raw.strip():
                    continue
                nonblank += 1
                where = f"{path}:{lineno}"
                line = _decode(raw)
                if line is None or "\x00" in line:
                    bad.append(Unreadable(str(path), lineno, "binary data (not UTF-8 text)"))
                    continue
                try:
                    record, text = parse_jsonl_line(line, where, text_field)
                except LmforgeError as e:
                    bad.append(Unreadable(str(path), lineno, str(e).removeprefix(f"{where}: ")))
                    continue
                doc_id = record.get(id_field)
                meta = {k: v for k, v in record.items() if k not in (text_field, id_field)}
                yield Document(
                    id=where if doc_id is None else str(doc_id), text=text, metadata=meta, source=where, file=str(path)
                )
    except stream_errors(path) as e:
        # The lines before the cut were yielded; the rest of the file is one unreadable entry.
        bad.append(Unreadable(str(path), lineno + 1, f"cannot read further: truncated or corrupt ({e})"))
        return
    if nonblank == 0:
        bad.append(Unreadable(str(path), None, "empty file"))


# --- WARC (warcio) ---

HTML_TYPES = ("text/html", "application/xhtml+xml")
TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)
WARC_MARKER = b"WARC/1."
GZIP_MAGIC = b"\x1f\x8b\x08"


def _mime_charset(content_type: str | None) -> tuple[str, str | None]:
    """(`text/html`, `utf-8`) of a Content-Type header value."""
    mime, _, params = (content_type or "").partition(";")
    m = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", params, re.IGNORECASE)
    return mime.strip().lower(), m[1] if m else None


def _decode_page(payload: bytes, *charsets: str | None) -> str | None:
    """`payload` decoded with the first of `charsets` (then a `<meta charset>`, then UTF-8) that fits."""
    meta = META_CHARSET.search(payload[:4096])
    for cs in (*charsets, meta[1].decode("ascii", "replace") if meta else None, "utf-8"):
        if not cs:
            continue
        try:
            return payload.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return None


def _title(page: str) -> str | None:
    m = TITLE.search(page[:65536].encode("utf-8", "replace"))
    title = " ".join(htmllib.unescape(m[1].decode("utf-8", "replace")).split()) if m else ""
    return title or None


def _warc_document(record, path: Path, offset: int, limit: int) -> Document | str | None:
    """The document of one WARC record, a reason it is unreadable, or None for a record that holds none."""
    headers = record.rec_headers
    if record.rec_type == "response":
        if record.http_headers is None or not (record.http_headers.get_statuscode() or "").startswith("2"):
            return None  # dns: records, redirects, errors
        content_type = record.http_headers.get_header("Content-Type")
    elif record.rec_type in ("resource", "conversion"):
        content_type = headers.get_header("Content-Type")
    else:
        return None  # warcinfo, request, metadata, revisit
    mime, charset = _mime_charset(content_type)
    if mime not in HTML_TYPES and mime != "text/plain":
        return None  # images, scripts, PDFs...
    try:
        payload = record.content_stream().read(limit + 1)  # undoes chunked transfer and Content-Encoding
    except Exception as e:  # noqa: BLE001 (zlib, brotli, chunked-encoding errors: this record only)
        return f"cannot decode the payload ({type(e).__name__}: {e})"
    if len(payload) > limit:
        return f"payload too large (over {limit:,} bytes: max_record_bytes)"
    page = _decode_page(payload, charset)
    if page is None or "\x00" in page:
        return f"binary data (not text in {charset or 'UTF-8'})"
    url = headers.get_header("WARC-Target-URI")
    meta = {"url": url, "date": headers.get_header("WARC-Date")}
    where = f"{path}@{offset}"
    doc_id = headers.get_header("WARC-Record-ID") or where
    if mime == "text/plain":
        return Document(id=doc_id, text=page, metadata=meta, source=where, file=str(path))
    if title := _title(page):
        meta["title"] = title
    return Document(id=doc_id, text="", metadata={**meta, "html": page}, source=where, file=str(path))


def _next_record_start(f, after: int, gz: bool) -> int | None:
    """The offset of the next plausible record start after `after`: a gzip member, or a `WARC/1.` line."""
    marker = GZIP_MAGIC if gz else b"\n" + WARC_MARKER
    f.seek(after)
    base, tail = after, b""
    while block := f.read(1 << 20):
        data = tail + block
        i = data.find(marker)
        if i >= 0:
            return base - len(tail) + i + (0 if gz else 1)
        tail = data[-len(marker) + 1 :]
        base += len(block)
    return None


def _read_warc(path: Path, bad: list[Unreadable], limit: int) -> Iterator[Document]:
    from warcio.archiveiterator import ArchiveIterator

    size = path.stat().st_size
    if size == 0:
        bad.append(Unreadable(str(path), None, "empty file"))
        return
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC[:2]
        pos: int | None = 0
        while pos is not None and pos < size:
            f.seek(pos)
            it = ArchiveIterator(f)  # offsets are positions in the file (compressed ones in a .gz)
            start = pos
            try:
                for record in it:
                    start, warnings = it.offset, it.err_count  # the record's first byte
                    doc = _warc_document(record, path, start, limit)
                    with contextlib.redirect_stderr(io.StringIO()):  # warcio prints a warning for a bad length
                        it.read_to_end()  # reads the rest of the record: its damage shows only now
                    missing = getattr(record.raw_stream, "limit", 0)
                    if not (record.rec_headers.get_header("Content-Length") or "").strip().isdigit():
                        doc = "truncated or corrupt header (no Content-Length)"
                    elif missing:
                        doc = f"truncated record ({missing} bytes missing)"
                    elif it.err_count > warnings:
                        doc = "corrupt record (not followed by a blank line: wrong Content-Length?)"
                    if isinstance(doc, str):
                        bad.append(Unreadable(str(path), None, f"record at byte {start}: {doc}", start))
                    elif doc is not None:
                        yield doc
                end, why = it.offset, "cannot read further: truncated or corrupt"
                if gz and _cut_member(f, start):  # warcio reads the text of a cut member without a word
                    end, why = start, "truncated gzip member: the file ends inside it"
                elif end >= size or not _rest(f, end).strip():
                    return
            except Exception as e:  # noqa: BLE001 (warcio's ArchiveLoadFailed, zlib.error, header parse errors...)
                msg = (str(e).strip().splitlines() or [""])[0]
                if "non-chunked gzip" in str(e):
                    msg = "the gzip is not one member per record (fix: warcio recompress FILE NEW.warc.gz)"
                end, why = it.offset, f"corrupt record ({type(e).__name__}: {msg})"  # the record that failed
            if not bad or (bad[-1].file, bad[-1].offset) != (str(path), end):  # one entry per damaged spot
                bad.append(Unreadable(str(path), None, f"record at byte {end}: {why}", end))
            pos = _next_record_start(f, end + 1, gz)


def _rest(f, offset: int) -> bytes:
    f.seek(offset)
    return f.read(4096)


def _cut_member(f, offset: int) -> bool:
    """Whether the gzip member at `offset` stops before its end (warcio reads a cut member's text silently)."""
    f.seek(offset)
    d = zlib.decompressobj(31)
    try:
        while (block := f.read(1 << 20)) and not d.eof:
            d.decompress(block)
    except zlib.error:
        return True
    return not d.eof


# --- Hugging Face datasets ---


def _jsonable(value):
    """`value` as JSON can hold it (dates and other objects as strings), for `metadata`."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)


def _pick_split(src: HfSource, splits: dict):
    if src.split is not None:
        if src.split not in splits:
            raise LmforgeError(f"{src}: no split {src.split!r} (splits: {', '.join(splits)})")
        return splits[src.split]
    if "train" in splits or len(splits) == 1:
        return splits["train" if "train" in splits else next(iter(splits))]
    raise LmforgeError(f"{src}: several splits ({', '.join(splits)}); name one: hf:{src.name}:SPLIT")


def open_hf(src: HfSource):
    """The rows of `src`: a memory-mapped `Dataset` for a `save_to_disk` folder, else a streaming `IterableDataset`."""
    try:
        import datasets
    except ImportError:
        raise LmforgeError(f"{src}: reading datasets needs the datasets library: pip install 'lmforge[hf]'") from None
    local = Path(src.name).expanduser()
    try:
        if local.is_dir() and _saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                return _pick_split(src, ds)
            if src.split is not None:
                raise LmforgeError(f"{src}: {local} holds a single split saved with save_to_disk; drop :{src.split}")
            return ds
        ds = datasets.load_dataset(str(local) if local.is_dir() else src.name, split=src.split, streaming=True)
        return _pick_split(src, ds) if isinstance(ds, dict) else ds
    except LmforgeError:
        raise
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds: not found, offline, bad builder config)
        first = (str(e).strip().splitlines() or [""])[0]
        raise LmforgeError(f"{src}: cannot open the dataset ({type(e).__name__}: {first})") from None


def _read_hf(src: HfSource, text_field: str, id_field: str, bad: list[Unreadable], limit: int) -> Iterator[Document]:
    ds = open_hf(src)
    columns = ds.column_names  # None for a streamed dataset whose features are not known up front
    if columns is not None and text_field not in columns:
        raise LmforgeError(
            f"{src}: no column {text_field!r} (columns: {', '.join(columns)}); choose one with --text-field"
        )
    row = 0
    try:
        for row, record in enumerate(ds, start=1):
            where = f"{src}:{row}"
            text = record.get(text_field)
            if not isinstance(text, str):
                why = f"no {text_field!r} field" if text is None else f"{text_field!r} is not a string"
                bad.append(Unreadable(str(src), row, why))
                continue
            if "\x00" in text:
                bad.append(Unreadable(str(src), row, "binary data (NUL characters)"))
                continue
            if 4 * len(text) > limit and (size := len(text.encode("utf-8", "surrogatepass"))) > limit:
                bad.append(Unreadable(str(src), row, _too_large(size, limit)))
                continue
            doc_id = record.get(id_field)
            # A streamed dataset fills a field a row lacks with None: left out, as a JSONL reader would.
            meta = {k: _jsonable(v) for k, v in record.items() if k not in (text_field, id_field) and v is not None}
            yield Document(
                id=where if doc_id is None else str(doc_id), text=text, metadata=meta, source=where, file=str(src)
            )
    except Exception as e:  # noqa: BLE001 (a corrupt file behind a streamed dataset; rows yielded stay)
        first = (str(e).strip().splitlines() or [""])[0]
        bad.append(Unreadable(str(src), row + 1, f"cannot read further ({type(e).__name__}: {first})"))
        return
    if row == 0:
        bad.append(Unreadable(str(src), None, "empty dataset"))


def read_file(
    path: Path | HfSource,
    bad: list[Unreadable],
    text_field: str = "text",
    id_field: str = "id",
    max_record_bytes: int = MAX_RECORD_BYTES,
    split: TextSplit | None = None,
) -> Iterator[Document]:
    """The documents of one file (or dataset); what cannot be read is appended to `bad`."""
    limit = max_record_bytes
    if isinstance(path, HfSource):
        yield from _read_hf(path, text_field, id_field, bad, limit)
        return
    kind = _kind(path)
    if kind is None:
        bad.append(Unreadable(str(path), None, f"unsupported file type (expected {', '.join(SUFFIXES)})"))
    elif kind in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field, id_field, bad, limit)
    elif kind in WARC_SUFFIXES:
        yield from _read_warc(path, bad, limit)
    else:
        yield from _read_whole(path, kind, bad, limit, split or TextSplit())


def read_documents(
    paths: Iterable[str | Path],
    bad: list[Unreadable],
    text_field: str = "text",
    id_field: str = "id",
    max_record_bytes: int = MAX_RECORD_BYTES,
    split: TextSplit | None = None,
) -> Iterator[Document]:
    """Every document under `paths`, in a deterministic order; unreadable records go to `bad`."""
    for path in list_inputs(paths):
        yield from read_file(path, bad, text_field, id_field, max_record_bytes, split)
