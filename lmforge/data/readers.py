"""Read documents from text corpora: `.txt`, `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`.

    from lmforge.data.readers import iter_docs
    for doc in iter_docs(["corpus/"]):   # used by `lmforge tokenizer train` and `lmforge data tokenize`
        doc.text, doc.source, doc.file

Folders are walked recursively in sorted order (hidden files skipped), so every
run sees the documents in the same order. A JSONL line or a Parquet row is one
document, its text in `text_field`. A `.txt` file is a stream of documents, split
by `textsplit.split_text` (blank-line paragraphs grouped up to 16 KiB, or `--doc-sep`);
how it split (a separator that never occurs, over-long lines cut) is a one-line warning.

This stage is strict: an empty or non-UTF-8 file (with a guess at its encoding), a
malformed JSONL line, or a record without the text field is an `LmforgeError` naming
the file (and line). Empty texts inside JSONL/Parquet records are skipped: they carry
nothing to learn.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from lmforge.data.textsplit import TextSplit, split_file_text
from lmforge.errors import LmforgeError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PARQUET_BATCH_ROWS = 1024


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def list_files(paths: Iterable[str | Path]) -> list[Path]:
    """The input files named by `paths` (files, or folders walked recursively), in a deterministic order."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and _kind(f) and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise LmforgeError(f"{p}: no readable files in this folder (expected {', '.join(SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            if not _kind(p):
                raise LmforgeError(f"{p}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise LmforgeError(f"{p}: no such file or folder")
    if not files:
        raise LmforgeError("no input files given")
    return files


class Doc(NamedTuple):
    text: str
    source: str  # FILE:LINE (text, JSONL) or FILE:rowN (Parquet)
    file: str  # the input file, for per-file counts and splits


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


def _decode(data: bytes, where: str, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = data[e.start]
        enc = guess_encoding(data)
        hint = ""
        if enc:
            also = " (or BIG5, SHIFT_JIS: a guess)" if enc == "gb18030" else ""
            hint = f"; it looks like {enc.upper()}{also}: convert it with iconv -f {enc.upper()} -t UTF-8"
        raise LmforgeError(
            f"{where}: not valid UTF-8 (byte 0x{byte:02x} at offset {base_offset + e.start}){hint}"
        ) from None


def _read_txt(path: Path, split: TextSplit) -> Iterator[Doc]:
    data = path.read_bytes()
    if not data.strip():
        raise LmforgeError(f"{path}: empty file")
    text = _decode(data, str(path)).removeprefix("\ufeff")  # a byte-order mark is an encoding artifact, not text
    del data
    for piece in split_file_text(text, split, str(path)):
        yield Doc(piece.text, f"{path}:{piece.line}", str(path))


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


def parse_jsonl_line(line: str, where: str, text_field: str) -> tuple[dict, str]:
    """The record of one JSONL line and its text; an `LmforgeError` naming `where` if either is malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise LmforgeError(f"{where}: record has no {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, str):
        raise LmforgeError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return record, text


def _read_jsonl(path: Path, text_field: str) -> Iterator[Doc]:
    offset, nonblank = 0, 0
    try:
        with open_jsonl(path) as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                line = _decode(raw, str(path), offset)
                offset += len(raw)
                if not line.strip():
                    continue
                nonblank += 1
                _, text = parse_jsonl_line(line, where, text_field)
                if text:
                    yield Doc(text, where, str(path))
    except stream_errors(path) as e:
        raise LmforgeError(f"{path}: cannot read ({e})") from None
    if nonblank == 0:
        raise LmforgeError(f"{path}: empty file")


def _read_parquet(path: Path, text_field: str) -> Iterator[Doc]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LmforgeError(f"{path}: not a readable Parquet file ({e})") from None
    field = pf.schema_arrow.field(text_field) if text_field in pf.schema_arrow.names else None
    if field is None:
        raise LmforgeError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise LmforgeError(f"{path}: column {text_field!r} is {field.type}, not a string column")
    if pf.metadata.num_rows == 0:
        raise LmforgeError(f"{path}: empty file")
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise LmforgeError(f"{path}: row {row}: {text_field!r} is null")
            if text:
                yield Doc(text, f"{path}:row{row}", str(path))
            row += 1


def iter_file(path: Path, text_field: str = "text", split: TextSplit | None = None) -> Iterator[Doc]:
    """The documents of one file; `split` says how a `.txt` file splits into documents (default: `TextSplit()`)."""
    kind = _kind(path)
    if kind == ".txt":
        yield from _read_txt(path, split or TextSplit())
    elif kind == ".parquet":
        yield from _read_parquet(path, text_field)
    else:
        yield from _read_jsonl(path, text_field)


def iter_docs(paths: Iterable[str | Path], text_field: str = "text", split: TextSplit | None = None) -> Iterator[Doc]:
    """Every document under `paths`, in a deterministic order."""
    for path in list_files(paths):
        yield from iter_file(path, text_field, split)


def iter_texts(paths: Iterable[str | Path], text_field: str = "text", split: TextSplit | None = None):
    """(text, source) of every document under `paths`, in a deterministic order."""
    for doc in iter_docs(paths, text_field, split):
        yield doc.text, doc.source


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
