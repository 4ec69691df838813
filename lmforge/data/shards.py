"""Token shard files: the format `lmforge data tokenize` writes and the pretraining data loader reads.

    from lmforge.data.shards import load_index, open_shard
    index = load_index("runs/data", expected_tokenizer_hash=tokenizer_hash("runs/tok"))
    tokens = open_shard(Path("runs/data") / index["splits"]["train"][0]["file"])   # read-only np.memmap

A shard `DIR/{split}_{index:06d}.bin` is a 1024-byte header then the raw tokens, little-endian
uint16 (vocab_size <= 65536) or uint32. The header is `b"LMFSHARD"`, a uint32 little-endian JSON
length, then UTF-8 JSON, zero-padded to 1024 bytes:

    {"version": 1, "dtype": "uint16", "vocab_size": V, "tokenizer_hash": "...", "eot_id": 0,
     "num_tokens": n, "num_docs": d, "num_bytes": b}

num_bytes is the UTF-8 size of the documents' text (for bits per byte). Every document's tokens are
followed by eot_id. `DIR/index.json` lists the shards per split and is written last, so a folder
without it is an unfinished run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path

MAGIC = b"LMFSHARD"
HEADER_SIZE = 1024
VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
INDEX_KEYS = ("version", "dtype", "vocab_size", "tokenizer_hash", "eot_id", "splits")
SHARD_KEYS = {"file", "num_tokens", "num_docs", "num_bytes"}
HEADER_KEYS = ("version", "dtype", "vocab_size", "tokenizer_hash", "eot_id", "num_tokens", "num_docs", "num_bytes")


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray, header: dict) -> None:
    """Write `tokens` with `header` (num_tokens is filled in) to `path` atomically."""
    dtype = DTYPES[header["dtype"]]
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    meta = json.dumps({**header, "version": VERSION, "num_tokens": int(tokens.size)}).encode("utf-8")
    if len(MAGIC) + 4 + len(meta) > HEADER_SIZE:
        raise ValueError(f"shard header JSON is {len(meta)} bytes, too long for {HEADER_SIZE}")
    head = (MAGIC + struct.pack("<I", len(meta)) + meta).ljust(HEADER_SIZE, b"\0")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        f.write(tokens.tobytes())


def read_header(path: str | Path) -> dict:
    """The header of shard `path`, checked against the file size; LmforgeError naming the file if it is bad."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        size = path.stat().st_size
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
        raise LmforgeError(f"{path}: not an lmforge token shard (bad magic or truncated header)")
    (n,) = struct.unpack("<I", head[len(MAGIC) : len(MAGIC) + 4])
    try:
        header = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LmforgeError(f"{path}: corrupt shard header") from None
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing or header["dtype"] not in DTYPES:
        raise LmforgeError(f"{path}: corrupt shard header (missing {', '.join(missing) or 'a valid dtype'})")
    if header["version"] != VERSION:
        raise LmforgeError(f"{path}: shard format version {header['version']}, this lmforge reads {VERSION}")
    expected = HEADER_SIZE + header["num_tokens"] * DTYPES[header["dtype"]].itemsize
    if size != expected:
        raise LmforgeError(f"{path}: truncated or padded shard ({size} bytes, header says {expected})")
    return header


def open_shard(path: str | Path) -> np.memmap:
    """The tokens of shard `path` as a read-only 1-D memmap (header checked first)."""
    header = read_header(path)
    if header["num_tokens"] == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=DTYPES[header["dtype"]])
    return np.memmap(path, dtype=DTYPES[header["dtype"]], mode="r", offset=HEADER_SIZE, shape=(header["num_tokens"],))


def load_index(data_dir: str | Path, expected_tokenizer_hash: str | None = None) -> dict:
    """Read `data_dir/index.json`; LmforgeError if it is missing, corrupt, or made with another tokenizer."""
    path = Path(data_dir) / "index.json"
    if not path.is_file():
        raise LmforgeError(f"{path}: no shard index here (run `lmforge data tokenize`, or it did not finish)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: corrupt shard index ({e})") from None
    problem = _index_problem(index)
    if problem:
        raise LmforgeError(f"{path}: corrupt shard index ({problem})")
    if index["version"] != VERSION:
        raise LmforgeError(f"{path}: shard format version {index['version']}, this lmforge reads {VERSION}")
    if expected_tokenizer_hash is not None and index["tokenizer_hash"] != expected_tokenizer_hash:
        raise LmforgeError(
            f"shards in {Path(data_dir)} were made with tokenizer {index['tokenizer_hash']}, "
            f"but this run uses {expected_tokenizer_hash}"
        )
    return index


def _index_problem(index) -> str | None:
    if not isinstance(index, dict):
        return "not a JSON object"
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(index["splits"], dict):
        return "splits is not an object"
    for split, entries in index["splits"].items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) and SHARD_KEYS <= e.keys() for e in entries):
            return f"bad shard list for split {split!r}"
    return None


def split_num_tokens(index: dict, split: str) -> int:
    """Total tokens of `split` ("train" or "val") in a loaded index (0 if the split has no shards)."""
    return sum(e["num_tokens"] for e in index["splits"].get(split, []))


class ShardWriter:
    """Collect whole documents (tokens ending in EOT) of one split into shards of about `shard_tokens` tokens.

    A shard is flushed once it holds at least `shard_tokens`, so it ends on a document boundary and
    memory stays bounded by one shard plus one document.
    """

    def __init__(self, out_dir: str | Path, split: str, header: dict, shard_tokens: int):
        self.out_dir, self.split, self.header, self.shard_tokens = Path(out_dir), split, header, shard_tokens
        self.entries: list[dict] = []
        self.buffer: list[np.ndarray] = []
        self.buf_tokens = self.buf_docs = self.buf_bytes = 0
        self.num_docs = 0  # documents added so far, flushed or not

    def add(self, tokens: np.ndarray, num_bytes: int) -> None:
        self.buffer.append(tokens)
        self.buf_tokens += tokens.size
        self.buf_docs += 1
        self.buf_bytes += num_bytes
        self.num_docs += 1
        if self.buf_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = shard_name(self.split, len(self.entries))
        counts = {"num_docs": self.buf_docs, "num_bytes": self.buf_bytes}
        write_shard(self.out_dir / name, np.concatenate(self.buffer), {**self.header, **counts})
        self.entries.append({"file": name, "num_tokens": self.buf_tokens, **counts})
        self.buffer, self.buf_tokens, self.buf_docs, self.buf_bytes = [], 0, 0, 0

    def close(self) -> list[dict]:
        """Flush what is left; return the index entries of this split's shards."""
        self.flush()
        return self.entries
