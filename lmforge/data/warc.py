"""WARC input (warcio): the pages and texts of a web crawl, for every command that reads documents.

    from lmforge.data.warc import read_warc
    for doc in read_warc(Path("crawl.warc.gz"), bad, limit):   # through lmforge.data.readers, by suffix

`.warc`, `.warc.gz`, `.warc.wet.gz`: one document per 2xx `response` (or `resource`,
`conversion`) record whose type is HTML (-> `metadata["html"]`, like an `.html` file) or plain text
(-> `text`); id = WARC-Record-ID, source = `file@byte_offset`, `metadata` gets `url`, `date` and the
page's `title`. Records that hold no document (warcinfo, request, metadata, revisit, redirects and
errors, images and other non-text payloads) are skipped silently: they are not input records. A
corrupt record, a truncated one, a payload that cannot be decoded (charset from the HTTP header or
a `<meta charset>`, else UTF-8) is one `Unreadable` entry with its byte `offset`; reading goes on
at the next record found (the next gzip member, or the next `WARC/1.` line).
"""

from __future__ import annotations

import contextlib
import html as htmllib
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.readers import Document, Unreadable

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


def read_warc(path: Path, bad: list[Unreadable], limit: int) -> Iterator[Document]:
    from warcio.archiveiterator import ArchiveIterator

    size = path.stat().st_size
    if size == 0:
        bad.append(Unreadable(str(path), None, "empty file", "empty file"))
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
                        bad.append(
                            Unreadable(str(path), None, f"record at byte {start}: {doc}", "bad WARC record", start)
                        )
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
                bad.append(Unreadable(str(path), None, f"record at byte {end}: {why}", "bad WARC record", end))
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
