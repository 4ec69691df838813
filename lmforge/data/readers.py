"""Every input format lmforge reads, in one registry: each command that takes input files reads them here.

    from lmforge.data.readers import iter_docs, read_documents, read_records
    for doc in iter_docs(["corpus/"]):            # strict: tokenizer train, data tokenize/train-quality/mix
        doc.text, doc.source, doc.file
    bad = []
    for doc in read_documents(["raw/"], bad):     # forgiving: data clean (what cannot be read goes to `bad`)
        ...
    for record, where, line in read_records(path, bad):   # raw records: the chat stages' conversations

| input | what one document (or record) is |
|---|---|
| `.txt` | a piece of a stream of documents, split by `textsplit` (blank-line paragraphs grouped up to 16 KiB, or `--doc-sep`) |
| `.jsonl`, `.jsonl.gz`, `.jsonl.zst` | a non-blank line (a JSON object) |
| `.json` | an element of a JSON list of objects (JSON Lines saved under a `.json` name are read as such) |
| `.parquet` | a row |
| `.html`, `.htm` | the file: a page, its main text extracted (trafilatura) |
| `.warc`, `.warc.gz`, `.warc.wet.gz` | a 2xx HTML or text response (lmforge/data/warc.py) |
| `hf:NAME_OR_PATH[:SPLIT]`, or a `save_to_disk` folder | a row of a Hugging Face dataset (lmforge/data/hf_datasets.py) |

Folders are walked recursively in sorted order (hidden files skipped), so every run sees the documents in the
same order. A record's text is its `text_field`, its id its `id_field` (else `FILE:LINE`), its other fields
`metadata`. A record larger than `max_record_bytes` (16 MiB: far above any real document) is unreadable, and
never held in memory whole. A `.txt` file is read whole and split, cutting over-long lines with a warning.

The readers and their messages are the same for every command; two policies use them:
- forgiving (`read_documents`, `lmforge data clean`): an unreadable record (invalid JSON, no text field, not
  UTF-8, NUL bytes, too large, a truncated `.gz`/`.zst`, an empty file, a file of an unknown type in a folder)
  is appended to `bad` as an `Unreadable` with its file, line and why, and reading goes on; every record a file
  holds ends up either as a `Document` or as one `Unreadable`. Pages keep their raw HTML in
  `metadata["html"]` (text empty) for the `extract_html` step.
- strict (`iter_docs`, every other command): the first unreadable record is an `LmforgeError`
  `FILE:LINE: why`; pages arrive with their main text extracted; empty texts are skipped (nothing to learn);
  files of an unknown type inside a folder are skipped with a one-line note.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmforge.data.textsplit import TextSplit, split_file_text
from lmforge.errors import LmforgeError, warn

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
RECORD_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet")
HTML_SUFFIXES = (".html", ".htm")
WARC_SUFFIXES = (".warc", ".warc.gz", ".warc.wet.gz")
SUFFIXES = (".txt", *RECORD_SUFFIXES, *HTML_SUFFIXES, *WARC_SUFFIXES)
MAX_RECORD_BYTES = 16 << 20  # the default `max_record_bytes`: a JSONL line, a text/HTML file, a WARC payload
PARQUET_BATCH_ROWS = 1024


@dataclass
class Document:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    source: str = ""  # where it was read: FILE:LINE, FILE:rowN, FILE@OFFSET (WARC), hf:...:ROW, or FILE
    file: str = ""  # the input file (or dataset), for per-file counts (not written out: `source` names it)

    def to_record(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "metadata": self.metadata}


@dataclass
class Unreadable:
    file: str
    line: int | None  # None when the whole file is unreadable (or for a WARC record: see offset)
    why: str
    reason: str = ""  # a short category to count by ("malformed JSON", "not UTF-8", ...); `why` has the detail
    offset: int | None = None  # byte offset of a WARC record

    def to_record(self) -> dict:
        record = {"file": self.file, "line": self.line, "why": self.why}
        if self.offset is not None:
            record["offset"] = self.offset
        return record

    def message(self) -> str:
        """The one-line error of the strict readers: `FILE:LINE: why`."""
        return f"{self.file}{'' if self.line is None else f':{self.line}'}: {self.why}"


class Strict(list):
    """A `bad` list that raises the first entry appended as an `LmforgeError`: the strict policy. Entries whose
    reason is in `allow` (e.g. "empty file" for a clean run's outputs, written even when empty) pass silently."""

    def __init__(self, allow: tuple[str, ...] = ()):
        super().__init__()
        self.allow = allow

    def append(self, entry: Unreadable) -> None:
        if entry.reason not in self.allow:
            raise LmforgeError(entry.message())


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


def saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def kind_of(path: Path) -> str | None:
    """The registry's suffix for `path` (`.jsonl.gz`, `.txt`, ...), or None for a type no reader takes."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def list_inputs(paths: Iterable[str | Path], strict: bool = False, json_in_folders: bool = False) -> list:
    """The inputs named by `paths`: files, folders walked recursively (hidden files skipped, sorted per folder),
    and datasets (`hf:...`, or a folder written by `save_to_disk`) as `HfSource`s. A missing path is an
    `LmforgeError`. A file of an unknown type: forgiving, listed (and later reported unreadable); strict, an
    error when named, skipped with a note inside a folder.

    A `.json` file inside a folder is taken only with `json_in_folders` (the chat stages, whose data is often
    `.json`): elsewhere a folder's `.json` files are its reports and indexes (`mix_report.json`, a tokenizer's
    `train_report.json`), not corpus; a `.json` file named by itself is read.
    """
    paths = list(paths)
    files: list[Path | HfSource] = []
    for spec in paths:
        if isinstance(spec, str) and spec.startswith("hf:"):
            files.append(parse_hf(spec))
            continue
        p = Path(spec)
        if p.is_dir() and saved_dataset(p):
            files.append(HfSource(f"hf:{p}", str(p)))
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not any(s.startswith(".") for s in f.relative_to(p).parts)
                and (json_in_folders or kind_of(f) != ".json")
            )
            known = [f for f in found if kind_of(f)] if strict else found
            if strict and len(known) < len(found):
                warn(f"{p}: skipped {len(found) - len(known)} file(s) of a type no reader takes "
                     f"(e.g. {next(f for f in found if not kind_of(f)).name})")  # fmt: skip
            if strict and not known:
                raise LmforgeError(f"{p}: no readable files in this folder (expected {', '.join(SUFFIXES)})")
            files.extend(known)
        elif p.is_file():
            if strict and not kind_of(p):
                raise LmforgeError(f"{p}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise LmforgeError(f"{p}: no such file or folder")
    if not files:
        raise LmforgeError(f"{', '.join(map(str, paths)) or 'no input given'}: no input files")
    return files


def list_files(paths: Iterable[str | Path]) -> list[Path | HfSource]:
    """The strict `list_inputs`: what `iter_docs` will read (checks every path before any work starts)."""
    return list_inputs(paths, strict=True)


# --- bytes to text ---

# Encodings users' non-UTF-8 files come in, tried in this order to name the likely one in the error.
GUESS_ENCODINGS = ("gb18030", "big5", "shift_jis", "euc-kr", "cp1252")


def guess_encoding(data: bytes) -> str | None:
    """The legacy encoding `data` most likely is in (None if no guess): a UTF-16 byte-order mark, or the first of
    GUESS_ENCODINGS that decodes it, for the CJK ones only if most of its non-ASCII text comes out as CJK."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    sample = data[: 1 << 16]
    for enc in GUESS_ENCODINGS:
        try:
            text = sample.decode(enc)
        except UnicodeDecodeError:
            if enc != "cp1252" and len(sample) < len(data):  # the sample may end inside a character
                try:
                    text = sample[:-4].decode(enc)
                except UnicodeDecodeError:
                    continue
            else:
                continue
        other = [c for c in text if ord(c) > 127]
        cjk = sum("\u3000" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af" or "\uff00" <= c <= "\uffef" for c in other)
        if enc == "cp1252" or (other and cjk >= 0.7 * len(other)):
            return enc
    return None


def not_utf8(data: bytes, error: UnicodeDecodeError, base_offset: int = 0) -> str:
    """Why `data` is unreadable: the first bad byte, and the encoding it likely is in with the command to convert."""
    enc = guess_encoding(data)
    hint = ""
    if enc:
        also = " (or BIG5, SHIFT_JIS: a guess)" if enc == "gb18030" else ""
        hint = f"; it looks like {enc.upper()}{also}: convert it with iconv -f {enc.upper()} -t UTF-8"
    return f"not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {base_offset + error.start}){hint}"


def _too_large(size: int, limit: int) -> str:
    return f"record too large ({size:,} bytes; max_record_bytes is {limit:,})"


# --- record formats: JSONL, JSON, Parquet, datasets ---


def open_jsonl(path: Path) -> BinaryIO:
    """Open a `.jsonl`, `.jsonl.gz` or `.jsonl.zst` file for reading binary lines."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # the raw zstd reader cannot iterate lines
    return open(path, "rb")


def stream_errors(path: Path) -> tuple[type[BaseException], ...]:
    """The exceptions a truncated or corrupt `.gz`/`.zst` stream raises while its lines are read."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    if path.name.lower().endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


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


def _json_line(raw: bytes, path: Path, lineno: int, offset: int, bad: list[Unreadable]):
    """The JSON value of one line, or None (blank, or unreadable: then in `bad`)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.append(Unreadable(str(path), lineno, not_utf8(raw, e, offset), "not UTF-8"))
        return None
    if lineno == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark is an encoding artifact, not JSON
    if "\x00" in line:
        bad.append(Unreadable(str(path), lineno, "binary data (NUL characters)", "binary data"))
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        bad.append(Unreadable(str(path), lineno, f"not valid JSON ({e.msg} at column {e.colno})", "malformed JSON"))
        return None


def _jsonl_records(path: Path, bad: list[Unreadable], limit: int, lines=None) -> Iterator[tuple]:
    nonblank = lineno = offset = 0
    try:
        with open_jsonl(path) if lines is None else contextlib.nullcontext(lines) as f:
            for lineno, raw in enumerate(_bounded_lines(f, limit), start=1):
                if isinstance(raw, int):
                    nonblank += 1
                    offset += raw + 1
                    bad.append(Unreadable(str(path), lineno, _too_large(raw, limit), "record too large"))
                    continue
                offset += len(raw)
                if not raw.strip():
                    continue
                nonblank += 1
                record = _json_line(raw, path, lineno, offset - len(raw), bad)
                if record is not None:
                    yield record, f"{path}:{lineno}", lineno
    except stream_errors(path) as e:
        # The lines before the cut were yielded; the rest of the file is one unreadable entry.
        bad.append(Unreadable(str(path), lineno + 1, f"cannot read further: truncated or corrupt ({e})",
                              "unreadable file"))  # fmt: skip
        return
    if nonblank == 0:
        bad.append(Unreadable(str(path), None, "empty file", "empty file"))


def _json_records(path: Path, bad: list[Unreadable], limit: int) -> Iterator[tuple]:
    # A .json file is one JSON value, read whole (it cannot be streamed line by line).
    size = path.stat().st_size
    data = path.read_bytes()
    if not data.strip():
        bad.append(Unreadable(str(path), None, "empty file", "empty file"))
        return
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        bad.append(Unreadable(str(path), None, not_utf8(data, e), "not UTF-8"))
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved under a .json name, as many hub datasets are
            yield from _jsonl_records(path, bad, max(limit, size), io.BytesIO(data))
        else:
            why = f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            bad.append(Unreadable(str(path), None, why, "malformed JSON"))
        return
    if not isinstance(records, list):
        why = "JSON file is not a list of records"
        bad.append(Unreadable(str(path), None, why, why))
        return
    for i, record in enumerate(records):
        yield record, f"{path}[{i}]", i + 1


def _parquet_records(path: Path, bad: list[Unreadable], columns: list[str] | None) -> Iterator[tuple]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        bad.append(Unreadable(str(path), None, f"not a readable Parquet file ({e})", "unreadable file"))
        return
    if pf.metadata.num_rows == 0:
        bad.append(Unreadable(str(path), None, "empty file", "empty file"))
        return
    names = pf.schema_arrow.names
    columns = [c for c in columns if c in names] if columns is not None else None
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield record, f"{path}:row{row - 1}", row


def read_records(src: Path | HfSource, bad: list[Unreadable], limit: int = MAX_RECORD_BYTES,
                 text_field: str | None = None, columns: list[str] | None = None) -> Iterator[tuple]:  # fmt: skip
    """(record, where, line) of every record of a JSONL/JSON/Parquet file or a dataset; unreadable ones go to `bad`.

    `text_field`: a Parquet file or dataset without that column is one `Unreadable` (strict: an error naming
    the columns). `columns`: read only these Parquet columns (when the other fields are not wanted).
    """
    if isinstance(src, HfSource):
        from lmforge.data.hf_datasets import read_hf_records

        yield from read_hf_records(src, bad, text_field)
        return
    kind = kind_of(src)
    if kind == ".json":
        yield from _json_records(src, bad, limit)
    elif kind == ".parquet":
        if text_field and _no_text_column(src, text_field, bad):
            return
        yield from _parquet_records(src, bad, columns)
    elif kind in JSONL_SUFFIXES:
        yield from _jsonl_records(src, bad, limit)
    else:
        bad.append(Unreadable(str(src), None, f"not a record file (expected {', '.join(RECORD_SUFFIXES)})",
                              "unsupported file type"))  # fmt: skip


def _no_text_column(path: Path, text_field: str, bad: list[Unreadable]) -> bool:
    """Whether a Parquet file has no string column `text_field` (then one `Unreadable` for the whole file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return False  # _parquet_records says why
    if text_field not in schema.names:
        why = f"no column {text_field!r} (columns: {', '.join(schema.names)})"
    else:
        tp = schema.field(text_field).type
        if pa.types.is_string(tp) or pa.types.is_large_string(tp):
            return False
        why = f"column {text_field!r} is {tp}, not a string column"
    bad.append(Unreadable(str(path), None, why, "no text field"))
    return True


def _documents(records: Iterable[tuple], src, text_field: str, id_field: str, bad: list[Unreadable],
               limit: int) -> Iterator[Document]:  # fmt: skip
    """Records to Documents: the text in `text_field` (a string), the id in `id_field`, the rest as metadata."""
    for record, where, line in records:
        if not isinstance(record, dict):
            bad.append(
                Unreadable(str(src), line, f"record is {type(record).__name__}, not a JSON object", "not a record")
            )
            continue
        text = record.get(text_field)
        if not isinstance(text, str):
            why = f"record has no {text_field!r} field" if text is None else f"{text_field!r} is not a string"
            bad.append(Unreadable(str(src), line, why, "no text field"))
            continue
        if "\x00" in text:
            bad.append(Unreadable(str(src), line, "binary data (NUL characters)", "binary data"))
            continue
        if 4 * len(text) > limit and (size := len(text.encode("utf-8", "surrogatepass"))) > limit:
            bad.append(Unreadable(str(src), line, _too_large(size, limit), "record too large"))
            continue
        doc_id = record.get(id_field) if id_field else None
        meta = {k: v for k, v in record.items() if k != text_field and (k != id_field or not id_field)}
        yield Document(id=where if doc_id is None else str(doc_id), text=text, metadata=meta, source=where,
                       file=str(src))  # fmt: skip


# --- whole files: text and HTML ---


def _read_whole(path: Path, kind: str, bad: list[Unreadable], limit: int, split: TextSplit) -> Iterator[Document]:
    size = path.stat().st_size
    if size > limit and kind != ".txt":
        bad.append(Unreadable(str(path), None, _too_large(size, limit), "record too large"))
        return
    data = path.read_bytes()
    if not data.strip():
        bad.append(Unreadable(str(path), None, "empty file", "empty file"))
        return
    if b"\x00" in data[: 1 << 16] and guess_encoding(data) != "utf-16":
        bad.append(Unreadable(str(path), None, "binary data (NUL bytes: not a text file)", "binary data"))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.append(Unreadable(str(path), None, not_utf8(data, e), "not UTF-8"))
        return
    if "\x00" in text:
        bad.append(Unreadable(str(path), None, "binary data (NUL characters)", "binary data"))
        return
    del data
    text = text.removeprefix("\ufeff")  # a byte-order mark is an encoding artifact, not text
    if kind != ".txt":
        yield Document(id=path.name, text="", metadata={"html": text}, source=str(path), file=str(path))
        return
    for piece in split_file_text(text, split, str(path)):
        yield Document(id=f"{path.name}:{piece.line}", text=piece.text, metadata={}, source=f"{path}:{piece.line}",
                       file=str(path))  # fmt: skip


# --- the two policies ---


def read_file(
    path: Path | HfSource,
    bad: list[Unreadable],
    text_field: str = "text",
    id_field: str = "id",
    max_record_bytes: int = MAX_RECORD_BYTES,
    split: TextSplit | None = None,
    metadata: bool = True,
) -> Iterator[Document]:
    """The documents of one input; what cannot be read is appended to `bad`. `metadata=False` reads only the
    text and id of Parquet files (faster when the other columns are not wanted)."""
    limit = max_record_bytes
    kind = None if isinstance(path, HfSource) else kind_of(path)
    if isinstance(path, HfSource) or kind in RECORD_SUFFIXES:
        columns = None if metadata else [text_field, id_field]
        records = read_records(path, bad, limit, text_field, columns)
        yield from _documents(records, path, text_field, id_field, bad, limit)
    elif kind is None:
        bad.append(Unreadable(str(path), None, f"unsupported file type (expected {', '.join(SUFFIXES)})",
                              "unsupported file type"))  # fmt: skip
    elif kind in WARC_SUFFIXES:
        from lmforge.data.warc import read_warc

        yield from read_warc(path, bad, limit)
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
    """Forgiving: every document under `paths`, in a deterministic order; unreadable records go to `bad`."""
    for path in list_inputs(paths):
        yield from read_file(path, bad, text_field, id_field, max_record_bytes, split)


def iter_file(path: Path | HfSource, text_field: str = "text", split: TextSplit | None = None,
              id_field: str = "id", metadata: bool = False) -> Iterator[Document]:  # fmt: skip
    """Strict: the non-empty documents of one input, pages with their main text extracted; the first unreadable
    record is an `LmforgeError`. `split` says how a `.txt` file splits into documents (default: `TextSplit()`)."""
    for doc in read_file(path, Strict(), text_field, id_field, split=split, metadata=metadata):
        if "html" in doc.metadata:
            doc = extracted_page(doc)
        if doc.text:
            yield doc


def extracted_page(doc: Document) -> Document:
    """A page's main text (trafilatura, as the `extract_html` step of `data clean` does); "" if it has none."""
    from lmforge.data.clean.steps.html import ExtractHtmlConfig, extract_html

    out = extract_html(doc, ExtractHtmlConfig())
    if isinstance(out, str):  # no main text: nothing to learn from this page
        doc.text = ""
        return doc
    return out


def iter_docs(
    paths: Iterable[str | Path], text_field: str = "text", split: TextSplit | None = None
) -> Iterator[Document]:
    """Strict: every non-empty document under `paths`, in a deterministic order."""
    for path in list_files(paths):
        yield from iter_file(path, text_field, split)


def iter_texts(paths: Iterable[str | Path], text_field: str = "text", split: TextSplit | None = None):
    """Strict: (text, source) of every non-empty document under `paths`, in a deterministic order."""
    for doc in iter_docs(paths, text_field, split):
        yield doc.text, doc.source


# --- how .txt inputs split: the flags every reading command takes ---


def add_split_args(parser, defaults: bool = True) -> None:
    """`--doc-sep`, `--doc-bytes`, `--max-doc-bytes`: how `.txt` inputs split into documents (`textsplit.py`).
    With `defaults=False` unset flags stay None, so a config file's values can fill them (`split_from_args`)."""
    from lmforge.data.textsplit import DOC_BYTES, MAX_DOC_BYTES

    parser.add_argument("--doc-sep", default=None, metavar="SEP",
                        help="in .txt files, documents are separated by SEP (e.g. '<|endoftext|>'; '\\n' escapes "
                        "allowed); default: blank-line paragraphs grouped up to --doc-bytes")  # fmt: skip
    parser.add_argument("--doc-bytes", type=int, default=DOC_BYTES if defaults else None, metavar="N",
                        help=f"largest .txt document when grouping paragraphs (default {DOC_BYTES:,})")  # fmt: skip
    parser.add_argument(
        "--max-doc-bytes",
        type=int,
        default=MAX_DOC_BYTES if defaults else None,
        metavar="N",
        help=f"with --doc-sep, longer documents are cut at line boundaries (default {MAX_DOC_BYTES:,})",
    )


def _unescape(sep: str | None) -> str | None:
    return None if sep is None else sep.replace("\\n", "\n").replace("\\t", "\t")


def split_from_args(args, cfg: dict | None = None) -> TextSplit:
    """The `TextSplit` of parsed `add_split_args` flags (`\\n`, `\\t` in --doc-sep read as escapes); flags left
    unset (added with `defaults=False`) take a config's `doc_sep`, `doc_bytes`, `max_doc_bytes`."""
    fields = {k: getattr(args, k) if getattr(args, k) is not None else (cfg or {}).get(k)
              for k in ("doc_sep", "doc_bytes", "max_doc_bytes")}  # fmt: skip
    fields["doc_sep"] = _unescape(fields["doc_sep"])
    return TextSplit(**{k: v for k, v in fields.items() if v is not None})
