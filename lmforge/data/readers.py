"""Read documents from text corpora: `.txt`, `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`.

    from lmforge.data.readers import iter_texts
    for text, source in iter_texts(["corpus/"]):   # used by `lmforge tokenizer train` and `lmforge data tokenize`
        ...

Folders are walked recursively in sorted order (hidden files skipped), so every
run sees the documents in the same order. A `.txt` file is one document; a JSONL
line or a Parquet row is one document, its text in `text_field`.

This stage is strict: an empty or non-UTF-8 file, a malformed JSONL line, or a
record without the text field is an `LmforgeError` naming the file (and line).
Empty texts inside JSONL/Parquet records are skipped: they carry nothing to learn.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

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


def _decode(data: bytes, where: str, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = data[e.start]
        raise LmforgeError(f"{where}: not valid UTF-8 (byte 0x{byte:02x} at offset {base_offset + e.start})") from None


def _read_txt(path: Path) -> Iterator[tuple[str, str]]:
    data = path.read_bytes()
    if not data:
        raise LmforgeError(f"{path}: empty file")
    text = _decode(data, str(path))
    yield text.removeprefix("\ufeff"), str(path)  # a byte-order mark is an encoding artifact, not text


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


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
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
                    yield text, where
    except stream_errors(path) as e:
        raise LmforgeError(f"{path}: cannot read ({e})") from None
    if nonblank == 0:
        raise LmforgeError(f"{path}: empty file")


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
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
                yield text, f"{path}:row{row}"
            row += 1


def iter_file(path: Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """The (text, source) documents of one file; source is the path, plus `:LINE` (JSONL) or `:rowN` (Parquet)."""
    kind = _kind(path)
    if kind == ".txt":
        yield from _read_txt(path)
    elif kind == ".parquet":
        yield from _read_parquet(path, text_field)
    else:
        yield from _read_jsonl(path, text_field)


def iter_texts(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield (text, source) for every document under `paths`, in a deterministic order."""
    for path in list_files(paths):
        yield from iter_file(path, text_field)
