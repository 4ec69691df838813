"""Extend a trained byte-level BPE tokenizer with new tokens learned on new text, keeping every old id.

    lmforge tokenizer extend --base runs/tok --input zh/ --add 2000 --out runs/tok-zh

How: train a fresh BPE on the new text with the base's pre-tokenizer, then walk its merges in order
and append each merge whose result is not yet in the base vocabulary (and whose two parts already
exist, so the merge can fire) to the base model: new ids come after the old ones, old merges keep
their ranks. A model trained with the base tokenizer can then be loaded with the extended one by
growing its embedding and output matrices: `train_report.json` records `base_vocab_size` (ids below it
mean the same tokens as before) and `base_tokenizer_hash`.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from lmforge.data.readers import iter_docs
from lmforge.data.textsplit import TextSplit
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.tokenizer.special import load_tokenizer, tokenizer_hash
from lmforge.tokenizer.train import HeldOut, bytes_per_token, tokenizer_config, write_tokenizer_files

MAX_RETRAINS = 6  # the extension BPE is retrained with a doubled size until it yields enough new merges


def _learn_merges(
    base, inputs, text_field: str, split: TextSplit, heldout_fraction: float, n_merges: int, min_frequency: int
):
    """Train a BPE with the base's pre-tokenizer on `inputs`; return (merges in order, HeldOut, hit_size_limit)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer.from_str(base.to_str())
    tok.model = models.BPE()
    held = HeldOut(heldout_fraction)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges,
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(held.train_batches(iter_docs(inputs, text_field, split)), trainer)
    if held.counts()["train_docs"] == 0:
        raise LmforgeError(f"{', '.join(map(str, inputs))}: no documents to learn new tokens from")
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    return merges, held, len(merges) >= n_merges


def _append_merges(base_json: dict, merges: list[tuple[str, str]], add: int) -> int:
    """Append up to `add` of `merges` (in order) to the base BPE model in `base_json`; return how many."""
    model = base_json["model"]
    vocab, old_merges = model["vocab"], model["merges"]
    as_strings = bool(old_merges) and isinstance(old_merges[0], str)
    next_id = max([*vocab.values(), *(t["id"] for t in base_json.get("added_tokens", []))]) + 1
    added = 0
    for a, b in merges:
        if added == add:
            break
        if a + b in vocab or a not in vocab or b not in vocab:
            continue
        vocab[a + b] = next_id
        old_merges.append(f"{a} {b}" if as_strings else [a, b])
        next_id += 1
        added += 1
    return added


def extend_tokenizer(
    base_dir: str | Path,
    inputs: list[str | Path],
    add: int,
    out: str | Path,
    *,
    min_frequency: int = 2,
    heldout_fraction: float = 0.05,
    text_field: str = "text",
    split: TextSplit | None = None,
) -> dict:
    """Append `add` tokens learned on `inputs` to the tokenizer in `base_dir`; write `out` atomically; return the report."""
    from tokenizers import Tokenizer

    if add < 1:
        raise LmforgeError(f"--add must be at least 1, got {add}")
    base = load_tokenizer(base_dir)
    base_json = json.loads(base.to_str())
    if base_json.get("model", {}).get("type") != "BPE":
        raise LmforgeError(f"{Path(base_dir) / 'tokenizer.json'}: not a BPE tokenizer, cannot extend it")
    base_size = base.get_vocab_size(with_added_tokens=True)
    t0 = time.perf_counter()
    n_merges = 2 * add
    for _ in range(MAX_RETRAINS):
        merges, held, hit_limit = _learn_merges(
            base, inputs, text_field, split or TextSplit(), heldout_fraction, n_merges, min_frequency
        )
        ext_json = json.loads(base.to_str())
        added = _append_merges(ext_json, merges, add)
        if added == add or not hit_limit:  # enough, or the new text has no more merges to give
            break
        n_merges *= 2
    ext = Tokenizer.from_str(json.dumps(ext_json))
    seconds = time.perf_counter() - t0

    # Verify what later stages rely on: old ids unchanged, exact round trips.
    ext_vocab = ext.get_vocab(with_added_tokens=True)
    changed = [t for t, i in base.get_vocab(with_added_tokens=True).items() if ext_vocab.get(t) != i]
    if changed:
        raise RuntimeError(f"extension changed the ids of {len(changed)} base tokens, e.g. {changed[0]!r}")
    check = held.texts or [d.text for d in itertools.islice(iter_docs(inputs, text_field, split), 100)]
    bad = [t for t in check if ext.decode(ext.encode(t).ids, skip_special_tokens=False) != t]
    if bad:
        raise RuntimeError(f"extended tokenizer does not round-trip {len(bad)} of {len(check)} documents")

    report = {
        "kind": "extend",
        "base_dir": str(Path(base_dir).resolve()),
        "base_tokenizer_hash": tokenizer_hash(base_dir),
        "base_vocab_size": base_size,
        "vocab_size": ext.get_vocab_size(with_added_tokens=True),
        "requested_add": add,
        "added": added,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        **held.counts(),  # train_docs, train_bytes, heldout_docs, heldout_bytes
        "files": held.split.files,
        "heldout_bytes_per_token": {
            "base": bytes_per_token(base, held.texts),
            "extended": bytes_per_token(ext, held.texts),
        },
        "train_seconds": round(seconds, 3),
    }
    config_path = Path(base_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else tokenizer_config()
    with atomic_dir(out) as tmp:
        write_tokenizer_files(ext, tmp, report, config)
    return report


def format_report(report: dict, out: str | Path) -> str:
    bpt = report["heldout_bytes_per_token"]
    line = (
        f"tokenizer: extended vocab {report['base_vocab_size']} -> {report['vocab_size']} "
        f"(+{report['added']} of {report['requested_add']} asked) in {report['train_seconds']:.1f}s -> {out}"
    )
    if bpt["base"] is not None:
        line += (
            f"\n  held-out new text ({report['heldout_docs']} docs, {report['heldout_bytes']:,} bytes): "
            f"{bpt['base']:.3f} bytes/token with the base, {bpt['extended']:.3f} extended"
        )
    if report["added"] < report["requested_add"]:
        line += f"\n  note: the new text only had {report['added']} new merges (min frequency reached)"
    return line
