"""Hugging Face datasets as input: `hf:NAME_OR_PATH[:SPLIT]`, or a folder written by `save_to_disk`.

    from lmforge.data.hf_datasets import read_hf_records
    for record, where, row in read_hf_records(HfSource("hf:data/x", "data/x"), bad):   # via lmforge.data.readers

The `datasets` library (`pip install 'lmforge[hf]'`): a `save_to_disk` folder (memory-mapped), a local
script-free dataset folder (JSONL/Parquet/CSV files), or a Hub dataset name, streamed; SPLIT defaults to
`train` or the only split. One record per row; rows count from 1, where = `hf:...:row`. A dataset that
cannot be opened is an `LmforgeError`; a row that cannot be read ends the dataset with one `Unreadable`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.readers import HfSource, Unreadable, saved_dataset
from lmforge.errors import LmforgeError


def jsonable(value):
    """`value` as JSON can hold it (dates and other objects as strings), for `metadata`."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
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
        if local.is_dir() and saved_dataset(local):
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


def read_hf_records(src: HfSource, bad: list[Unreadable], text_field: str | None = None) -> Iterator[tuple]:
    """(record, where, row) of every row of `src`; `text_field`, when given, must be a column (an error naming the
    columns otherwise). A row that cannot be read ends the dataset with one `Unreadable` entry."""
    ds = open_hf(src)
    columns = ds.column_names  # None for a streamed dataset whose features are not known up front
    if text_field and columns is not None and text_field not in columns:
        raise LmforgeError(
            f"{src}: no column {text_field!r} (columns: {', '.join(columns)}); choose one with --text-field"
        )
    row = 0
    try:
        for row, record in enumerate(ds, start=1):
            # A streamed dataset fills a field a row lacks with None: left out, as a JSONL reader would.
            yield (
                {k: v if isinstance(v, str) else jsonable(v) for k, v in record.items() if v is not None},
                f"{src}:{row}",
                row,
            )
    except Exception as e:  # noqa: BLE001 (a corrupt file behind a streamed dataset; rows yielded stay)
        first = (str(e).strip().splitlines() or [""])[0]
        bad.append(
            Unreadable(str(src), row + 1, f"cannot read further ({type(e).__name__}: {first})", "unreadable file")
        )
        return
    if row == 0:
        bad.append(Unreadable(str(src), None, "empty dataset", "empty file"))
