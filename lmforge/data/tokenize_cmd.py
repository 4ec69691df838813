"""`lmforge data tokenize`: turn a text corpus into token shards for pretraining (format: `shards.py`).

    lmforge data tokenize --input corpus/ --tokenizer runs/tok --out runs/data [--val-fraction 0.01] [--workers 2]

Documents are read in a fixed order (`readers.iter_docs`; `.txt` files split into documents as
`textsplit.py` says: `--doc-sep`, `--doc-bytes`), encoded in chunks, each followed by the end-of-text
id, and routed to the val split as a share of each input file's documents (`holdout.py`), so every
file, and every language in its own file, is on both sides. When that puts no document in val (every
file too small), the last document goes there, with a warning if that empties its file from train;
a corpus of one document has no val split and says so (pretraining then cannot validate).
`index.json` counts documents and bytes per input file and split. The output depends only on the
input and the tokenizer, not on --workers.

Parallelism: with --workers 1 the chunks are encoded in this process by `tokenizers`' own batch
encoder (Rust threads over all cores); with N > 1 a pool of N forked processes encodes chunks with
one thread each, at most 2N chunks in flight so memory stays bounded. Measured on 2 cores,
Shakespeare (5.1 MB, vocab 8192): 1 worker 2.7 MB/s, 2 workers 2.7 MB/s, one thread 1.3 MB/s: on
2 cores the two are equal; processes are the default because they also run the per-document Python
work (arrays, split hashes) in parallel. Reading stays in the main process.

Literal special-token strings inside documents (a web page containing "<|endoftext|>") are encoded
as plain text, never as the special id.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.data import data_subparsers
from lmforge.data.holdout import FileHoldout
from lmforge.data.parallel import closing_pool, make_pool, ordered_map
from lmforge.data.readers import iter_docs, list_files
from lmforge.data.shards import DTYPES, VERSION, ShardWriter, dtype_for_vocab
from lmforge.data.textsplit import TextSplit, TextSplitFields, nbytes
from lmforge.errors import LmforgeError, warn
from lmforge.fileio import atomic_write_json
from lmforge.tokenizer.special import EOT, document_end_id, load_tokenizer, tokenizer_hash

CHUNK_BYTES = 1_000_000  # documents go to the encoder in chunks of about this many bytes (or CHUNK_DOCS docs)
CHUNK_DOCS = 1024
SHARD_RE = re.compile(r"(train|val)_\d{6}\.bin")


@dataclass(frozen=True)
class TokenizeConfig(TextSplitFields):
    """`lmforge data tokenize`: each field's comment is its help text (the `tokenize` recipe section too)."""

    # files or folders in any format lmforge reads (txt, JSONL, JSON, Parquet, HTML, WARC, hf:NAME)
    input: list[str] = field(default_factory=list, metadata={"metavar": "FILE_OR_DIR"})
    tokenizer: str = ""  # tokenizer folder (from `lmforge tokenizer train`)
    out: str = ""  # output folder for the shards and index.json
    val_fraction: float = 0.01  # share of each input file's documents for val (0: no val split)
    workers: int | None = None  # encoder processes (unset: min(cpu count, 8))
    shard_tokens: int = 50_000_000  # tokens per shard
    text_field: str = "text"  # the field holding the text in record inputs (JSONL, JSON, Parquet, datasets)

    def validate(self) -> TokenizeConfig:
        self.text_split()  # raises on a bad doc_sep / doc_bytes
        require([
            (bool(self.input), "needs --input (files or folders)"),
            (bool(self.tokenizer), "needs --tokenizer (a folder from `lmforge tokenizer train`)"),
            (bool(self.out), "needs --out (the shard folder to write)"),
            (self.workers is None or self.workers >= 1, "workers must be >= 1"),
            (self.shard_tokens >= 1, "shard_tokens must be >= 1"),
        ])  # fmt: skip
        return self


def register(subparsers) -> None:
    help = "encode a corpus into token shards for pretraining"
    add_config_command(data_subparsers(subparsers), "tokenize", help, TokenizeConfig, run, description=__doc__)


def run(cfg: TokenizeConfig) -> dict:
    t0 = time.perf_counter()
    index = tokenize_corpus(
        cfg.input, cfg.tokenizer, cfg.out, val_fraction=cfg.val_fraction, workers=cfg.workers,
        shard_tokens=cfg.shard_tokens, text_field=cfg.text_field, split=cfg.text_split(),
    )  # fmt: skip
    print(format_summary(index, cfg.out, time.perf_counter() - t0))
    return index


# --- encoding (runs in this process or in pool workers) ---

_tok = None  # the worker's tokenizer, loaded once per process
_dtype = None


def _init_encoder(tokenizer_dir: str, single_thread: bool) -> None:
    global _tok, _dtype
    if single_thread:  # pool workers: parallelism comes from the processes, not from Rust threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tok = load_tokenizer(tokenizer_dir)
    _tok.encode_special_tokens = True
    _dtype = DTYPES[dtype_for_vocab(_tok.get_vocab_size(with_added_tokens=True))]


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    """Encode a chunk of documents: per document its tokens, EOT appended."""
    eot = document_end_id(_tok)
    tokens = []
    for enc in _tok.encode_batch_fast(texts, add_special_tokens=False):
        arr = np.empty(len(enc.ids) + 1, dtype=_dtype)
        arr[:-1] = enc.ids
        arr[-1] = eot
        tokens.append(arr)
    return tokens


def _chunks(docs: Iterable, split: FileHoldout, meta: list) -> Iterator[list[str]]:
    """Chunks of document texts for the encoder; each document's (file, UTF-8 size, is val) goes to `meta`, in
    the same order, since the split is decided here, in reading order, not in the workers."""
    chunk, size = [], 0
    for doc in docs:
        n = nbytes(doc.text)
        meta.append((doc.file, n, split.assign(doc.file, n)))
        chunk.append(doc.text)
        size += len(doc.text)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(chunks: Iterator[list[str]], tokenizer_dir: str, workers: int):
    """Yield `_encode_chunk` results in input order, in this process or across a pool of `workers`."""
    if workers == 1:
        _init_encoder(tokenizer_dir, single_thread=False)
        yield from map(_encode_chunk, chunks)
        return
    # fork (not spawn) so scripts without an `if __name__ == "__main__"` guard work. Setting
    # TOKENIZERS_PARALLELISM while forking keeps tokenizers from warning that a child of a process that
    # used its thread pool loses it; the workers are single-threaded on purpose.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = make_pool(workers, _init_encoder, (tokenizer_dir, True))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with closing_pool(pool):
        yield from ordered_map(pool, _encode_chunk, chunks, ahead=2 * workers)


# --- the stage ---


def tokenize_corpus(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.01,
    workers: int | None = None,
    shard_tokens: int = 50_000_000,
    text_field: str = "text",
    split: TextSplit | None = None,
    progress: bool = True,
) -> dict:
    """Encode the documents under `inputs` into shards in `out`; write `out/index.json` last and return it."""
    holdout = FileHoldout(val_fraction)
    if shard_tokens < 1:
        raise LmforgeError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise LmforgeError(f"--workers must be at least 1, got {workers}")
    split = split or TextSplit()
    tok = load_tokenizer(tokenizer_dir)
    eot_id = document_end_id(tok)
    if eot_id is None:
        raise LmforgeError(
            f"{Path(tokenizer_dir) / 'tokenizer.json'}: has no {EOT} (or [SEP]) token to end documents with"
        )
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    list_files(inputs)  # fail on a missing input before touching `out`
    out = Path(out)
    header = {"version": VERSION, "dtype": dtype_for_vocab(vocab_size), "vocab_size": vocab_size,
              "tokenizer_hash": tokenizer_hash(tokenizer_dir), "eot_id": eot_id}  # fmt: skip
    writers = None  # created with the folder once the first document has been read (a bad input leaves nothing)

    from tqdm import tqdm

    bar = tqdm(desc="tokenize", unit="B", unit_scale=True, disable=None if progress else True)
    meta: list[tuple[str, int, bool]] = []
    held = None  # the latest document is held back so the end can balance an empty split
    for tokens in _encoded(_chunks(iter_docs(inputs, text_field, split), holdout, meta), str(tokenizer_dir), workers):
        if writers is None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "index.json").unlink(missing_ok=True)  # the folder is unfinished until the new index lands
            writers = {s: ShardWriter(out, s, header, shard_tokens) for s in ("train", "val")}
        for arr, info in zip(tokens, meta[: len(tokens)], strict=True):
            if held is not None:
                writers["val" if held[1][2] else "train"].add(held[0], held[1][1])
            held = (arr, info)
        bar.update(sum(info[1] for info in meta[: len(tokens)]))
        del meta[: len(tokens)]
    bar.close()
    if held is None:
        raise LmforgeError(f"{', '.join(map(str, inputs))}: no documents (all texts are empty)")
    arr, (file, n, is_val) = held
    totals = holdout.totals()
    n_docs = totals["train_docs"] + totals["val_docs"]
    if n_docs >= 2 and val_fraction > 0 and writers["val"].num_docs == 0 and not is_val:
        holdout.move(file, n, held=True)  # every file was too small for its share: the last document is val
        is_val = True
        if file in holdout.whole_files(held=True):
            warn(f"{file}: its only document is the validation split (the corpus is too small to take a share of "
                 "each file; add text or lower --doc-bytes)")  # fmt: skip
    elif writers["train"].num_docs == 0 and is_val and n_docs >= 2:
        holdout.move(file, n, held=False)
        is_val = False
    writers["val" if is_val else "train"].add(arr, n)
    if val_fraction > 0 and n_docs < 2:
        warn(f"{', '.join(map(str, inputs))}: one document only, so no validation split (pretraining will not "
             "validate); add text, lower --doc-bytes or use --doc-sep")  # fmt: skip

    splits = {s: w.close() for s, w in writers.items()}
    keep = {e["file"] for entries in splits.values() for e in entries}
    for stale in out.iterdir():  # shards of an earlier, larger run in the same folder
        if SHARD_RE.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    index = {**header, "tokenizer_dir": str(Path(tokenizer_dir).resolve()), "splits": splits,
             "val_fraction": val_fraction, "text_split": split.to_dict(), "files": holdout.files}  # fmt: skip
    atomic_write_json(out / "index.json", index)
    return index


def format_summary(index: dict, out: str | Path, seconds: float) -> str:
    lines = [f"data: {out} ({index['dtype']}, vocab {index['vocab_size']}, tokenizer {index['tokenizer_hash']})"]
    for split, entries in index["splits"].items():
        docs = sum(e["num_docs"] for e in entries)
        tokens = sum(e["num_tokens"] for e in entries)
        nbytes = sum(e["num_bytes"] for e in entries)
        bpt = f"{nbytes / tokens:.3f} bytes/token" if tokens else "empty"
        lines.append(f"  {split}: {docs:,} docs, {tokens:,} tokens, {len(entries)} shards, {bpt}")
    mb = sum(e["num_bytes"] for entries in index["splits"].values() for e in entries) / 1e6
    lines.append(f"  {mb:.1f} MB of text in {seconds:.1f}s ({mb / max(seconds, 1e-9):.2f} MB/s)")
    return "\n".join(lines)
