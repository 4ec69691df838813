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
`.txt` (one document per file, id = the file name) and `.html`/`.htm` (one document per file;
the raw page is `metadata["html"]` and `text` stays empty until the `extract_html` step).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.readers import open_jsonl, parse_jsonl_line, stream_errors
from lmforge.errors import LmforgeError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = (*JSONL_SUFFIXES, ".txt", *HTML_SUFFIXES)


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
    line: int | None  # None when the whole file is unreadable
    why: str

    def to_record(self) -> dict:
        return {"file": self.file, "line": self.line, "why": self.why}


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def list_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """The files named by `paths` (files, or folders walked recursively, hidden files skipped), sorted per folder.

    A missing path is an `LmforgeError`; a file of an unknown type is listed and later reported unreadable.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
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


def _read_whole(path: Path, kind: str, bad: list[Unreadable]) -> Iterator[Document]:
    data = path.read_bytes()
    if not data.strip():
        bad.append(Unreadable(str(path), None, "empty file"))
        return
    text = _decode(data)
    if text is None or "\x00" in text:
        bad.append(Unreadable(str(path), None, "binary data (not UTF-8 text)"))
        return
    text = text.removeprefix("\ufeff")
    if kind == ".txt":
        yield Document(id=path.name, text=text, metadata={}, source=str(path), file=str(path))
    else:
        yield Document(id=path.name, text="", metadata={"html": text}, source=str(path), file=str(path))


def _read_jsonl(path: Path, text_field: str, id_field: str, bad: list[Unreadable]) -> Iterator[Document]:
    nonblank, lineno = 0, 0
    try:
        with open_jsonl(path) as f:
            for lineno, raw in enumerate(f, start=1):
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


def read_file(path: Path, bad: list[Unreadable], text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """The documents of one file; what cannot be read is appended to `bad`."""
    kind = _kind(path)
    if kind is None:
        bad.append(Unreadable(str(path), None, f"unsupported file type (expected {', '.join(SUFFIXES)})"))
    elif kind in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field, id_field, bad)
    else:
        yield from _read_whole(path, kind, bad)


def read_documents(
    paths: Iterable[str | Path], bad: list[Unreadable], text_field: str = "text", id_field: str = "id"
) -> Iterator[Document]:
    """Every document under `paths`, in a deterministic order; unreadable records go to `bad`."""
    for path in list_inputs(paths):
        yield from read_file(path, bad, text_field, id_field)
