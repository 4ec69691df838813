"""The encoder-decoder family (T5): parity with transformers' T5ForConditionalGeneration, cached greedy
generation, span corruption, `pretrain --preset t5-mini`, and import from transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.hub.t5 import config_from_hf_t5, t5_name_map
from lmforge.model.t5 import T5, relative_buckets
from lmforge.train.span import corrupt_spans, noise_mask, sentinel_ids, span_counts, window_length


def _pair(proj: str):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    hc = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                  feed_forward_proj=proj, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    hf = T5ForConditionalGeneration(hc).eval()
    with torch.no_grad():  # weights large enough that greedy outputs vary from token to token
        for p in hf.parameters():
            p.normal_(0, 0.5)
    cfg = config_from_hf_t5(hc.to_dict(), Path("config.json"))
    model = T5(cfg).eval()
    sd = hf.state_dict()
    missing, unexpected = model.load_state_dict({o: sd[t] for o, t in t5_name_map(cfg).items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the tied head
    return hf, model


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_logits_and_greedy_generation_match_transformers_t5(proj):
    hf, model = _pair(proj)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(2, 100, (2, 30), generator=g), torch.randint(2, 100, (2, 25), generator=g)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 22:] = 0
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        ours, _ = model(src, tgt, src_mask=mask.bool())
        assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-4
        dec = torch.zeros(2, 1, dtype=torch.long)  # transformers without a cache, one token at a time
        for _ in range(10):
            nxt = hf(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
    out = model.generate(src, 10, src_mask=mask.bool(), start_id=0)
    assert out.tolist() == dec[:, 1:].tolist() and len(set(out[0].tolist())) > 3


def test_relative_buckets_are_transformers_buckets():
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 301)[None, :].expand(3, -1)
    for bidirectional in (True, False):
        for buckets, far in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(distance, bidirectional, buckets, far)
            assert torch.equal(relative_buckets(distance, bidirectional, buckets, far), ref)


def test_span_corruption_keeps_every_token_once():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 10 + 114)  # below the sentinels (the top 100 of 1024 rows)
    mask = noise_mask(len(tokens), 0.15, 3.0, rng)
    noise, spans = span_counts(len(tokens), 0.15, 3.0)
    assert mask.sum() == noise and spans == 6
    assert int((np.diff(mask.astype(int)) == 1).sum()) + int(mask[0]) == spans  # exactly `spans` runs
    sentinels = sentinel_ids(1024)
    src, tgt = corrupt_spans(tokens, mask, sentinels, eos=7)
    assert src[-1] == 7 and tgt[-1] == 7 and len(src) == len(tokens) - noise + spans + 1
    # Putting each span back where its sentinel stands gives the window again.
    spans_of, current = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            current = t
            spans_of[t] = []
        else:
            spans_of[current].append(t)
    rebuilt = [x for t in src[:-1] for x in (spans_of[t] if t in sentinels else [t])]
    assert rebuilt == tokens.tolist()
    assert len(src) <= 128 and window_length(128, 0.15, 3.0) > 128  # the window is longer than the input


@pytest.fixture(scope="module")
def t5_run(small_shards, tmp_path_factory):
    """A tiny T5 pretrained for 40 steps on span corruption."""
    run = tmp_path_factory.mktemp("t5") / "run"
    args = ["--preset", "t5-mini", "--data", small_shards, "--out", run, "--max-steps", 40, "--batch-size", 8,
            "--seq-len", 64, "--lr", 3e-3, "--warmup-steps", 5, "--eval-every", 20, "--log-every", 5,
            "--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.d_ff=128", "--set",
            "model.dropout=0"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", *map(str, args)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_t5_pretrains_on_span_corruption_and_imports_from_transformers(t5_run, small_shards, tmp_path):
    from lmforge.train.checkpoint import load_model
    from lmforge.train.metrics import read_metrics

    run = t5_run
    records = read_metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.8
    vals = [r for r in records if "val_loss" in r]
    assert vals and "val_bpb" not in vals[-1]
    meta = json.loads(max((run / "checkpoints").glob("step_*")).joinpath("meta.json").read_text())
    assert meta["model_config"]["vocab_size"] >= 512 + 100  # the sentinels above the tokenizer's ids
    model, _, _ = load_model(run, encoder_ok=True)
    assert isinstance(model, T5)
    proc = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(run), "--prompt", "hi"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 2 and "does not generate text here" in proc.stderr

    hf, ours = _pair("relu")
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(small_shards.parent / "tok" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    proc = subprocess.run([sys.executable, "-m", "lmforge", "import", str(tmp_path / "hf"), "--out",
                           str(tmp_path / "imported")], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    back, _, _ = load_model(tmp_path / "imported", encoder_ok=True)
    src = torch.randint(2, 100, (1, 12))
    assert torch.equal(back.eval().generate(src, 6), ours.generate(src, 6))

    # Our own run out to transformers: the same logits.
    from transformers import T5ForConditionalGeneration

    proc = subprocess.run([sys.executable, "-m", "lmforge", "export", str(run), "--format", "hf", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    theirs = T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    mine, _, _ = load_model(run, encoder_ok=True)
    src, tgt = torch.randint(5, 500, (2, 20)), torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        ref = theirs(input_ids=src, decoder_input_ids=tgt).logits
        got, _ = mine.eval()(src, tgt)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_sft_on_t5_trains_input_to_target_pairs(t5_run, tmp_path):
    from lmforge.train.metrics import read_metrics
    from lmforge.train.sft import SftConfig, sft

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"instruction": f"repeat {w}", "output": w}) + "\n"
                             for w in ["sea", "fire", "tree", "stone", "wind"] * 12))  # fmt: skip
    cfg = SftConfig(base=str(t5_run), data=str(pairs), out=str(tmp_path / "sft"), max_steps=30, batch_size=8,
                    lr=3e-3, warmup_steps=3, eval_every=15, val_fraction=0.1).validate()  # fmt: skip
    result = sft(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if "loss" in r]
    assert losses[-1] < losses[0] - 1.0 and result["exact_match_n"] == 6
    assert "exact match:" in (tmp_path / "sft" / "samples.txt").read_text()
    report = json.loads((tmp_path / "sft" / "data_report.json").read_text())
    assert report["train_pairs"] == 54 and report["inputs_cut"] == 0
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "x", "output": "word " * 300}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "lmforge", "sft", "--model", str(t5_run), "--data", str(long),
                           "--out", str(tmp_path / "long"), "--target-len", "32"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 2 and "more than target_len=32" in proc.stderr and not (tmp_path / "long").exists()
