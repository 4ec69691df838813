"""GLM's blank infilling on the decoder: the rows, the attention (part A both ways, part B causal), 2D positions,
and `pretrain --objective glm`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.glm import glm_window, infill_row
from lmforge.train.span import noise_mask


def test_infill_rows_hold_every_token_once_with_2d_positions():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 10 + glm_window(128))
    mask = noise_mask(len(tokens), 0.15, 3.0, rng)
    row = infill_row(tokens, mask, mask_id=999, start_id=998, end_id=7, rng=rng)
    n, P = len(row["idx"]), row["prefix_len"]
    assert n <= 128 and all(len(v) == n for k, v in row.items() if k != "prefix_len")
    assert all(t == -100 for t in row["targets"][:P]) and row["block_positions"][:P] == [0] * P
    # Part B: each span behind [START], its targets the span then the end token, at its [MASK]'s position.
    spans, i = {}, P
    while i < n:
        assert row["idx"][i] == 998 and row["block_positions"][i] == 1
        j = i + 1
        while j < n and row["idx"][j] != 998:
            j += 1
        assert row["targets"][j - 1] == 7 and row["targets"][i : j - 1] == row["idx"][i + 1 : j]
        assert row["block_positions"][i:j] == list(range(1, j - i + 1)) and len(set(row["positions"][i:j])) == 1
        spans[row["positions"][i]] = row["idx"][i + 1 : j]
        i = j
    rebuilt = [t for p, x in enumerate(row["idx"][:P]) for t in (spans[p] if x == 999 else [x])]
    assert rebuilt == tokens.tolist() and sorted(spans) == [p for p in range(P) if row["idx"][p] == 999]


def test_part_a_sees_both_ways_and_part_b_causally():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, max_seq_len=32, pos_encoding="learned",
                      block_positions=True)  # fmt: skip
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 64, (1, 12))
    P = torch.tensor([6])

    def run(x):
        return model(x, prefix_len=P, block_positions=torch.arange(12)[None] % 3)[0][0]

    base = run(idx)
    late_a = idx.clone()
    late_a[0, 5] = (late_a[0, 5] + 1) % 64
    out = run(late_a)
    assert not torch.allclose(out[0], base[0])  # the first token of A sees A's last: not causal
    assert not torch.allclose(out[8], base[8])  # B sees all of A
    late_b = idx.clone()
    late_b[0, 10] = (late_b[0, 10] + 1) % 64
    out = run(late_b)
    assert torch.allclose(out[:10], base[:10], atol=1e-6)  # nothing before B's 11th token sees it
    with pytest.raises(LmforgeError, match="pos_encoding=learned"):
        ModelConfig(block_positions=True).validate()


@pytest.mark.parametrize("kind", ["span", "glm"])
def test_spans_do_not_depend_on_the_number_of_processes(small_shards, kind):
    """T5's and GLM's spans are drawn per row from where it starts in the stream: one process reading 4 rows draws
    what two ranks reading 2 each draw."""
    from lmforge.data.loader import TokenLoader
    from lmforge.train.glm import GlmBatches
    from lmforge.train.span import SpanBatches

    def batches(rows, rank=0, world=1):
        loader = TokenLoader(small_shards, "train", rows, 40, rank=rank, world_size=world)
        if kind == "span":
            return SpanBatches(loader, 512, eos=0, start=1, seed=5)
        return GlmBatches(loader, 512, end_id=0, seed=5)

    one, ranks = batches(4), [batches(2, r, 2) for r in (0, 1)]
    for _ in range(3):
        whole, parts = one.next_batch(), [b.next_batch() for b in ranks]
        keys = [k for k in whole if k != "num_tokens"]
        for key in keys:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key
        assert not torch.equal(parts[0][keys[0]], parts[1][keys[0]])


def test_glm_pretraining_loss_falls(small_shards, tmp_path):
    from lmforge.config import parse_set
    from lmforge.train.metrics import read_metrics
    from lmforge.train.pretrain import pretrain, resolve_train_config

    flags = {"data": str(small_shards), "out": str(tmp_path / "glm"), "objective": "glm", "batch_size": 8,
             "seq_len": 64, "max_steps": 40, "lr": 3e-3, "warmup_steps": 5, "eval_every": 20, "log_every": 5}  # fmt: skip
    cfg = resolve_train_config({}, flags, parse_set(["model.n_layer=2", "model.d_model=64", "model.n_head=4"]))
    assert cfg.model.block_positions and cfg.model.pos_encoding == "learned"
    pretrain(cfg)
    records = read_metrics(tmp_path / "glm")
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.8
    assert [r for r in records if "val_loss" in r] and cfg.model.vocab_size >= 512


def test_a_glm_run_fine_tunes_with_sft(small_shards, tmp_path):
    """The GLM-pretrained decoder is a decoder: `lmforge sft` trains it (plain text sits at block position 0)."""
    from lmforge.config import parse_set
    from lmforge.train.metrics import read_metrics
    from lmforge.train.pretrain import pretrain, resolve_train_config
    from lmforge.train.sft import SftConfig, sft

    flags = {"data": str(small_shards), "out": str(tmp_path / "glm"), "objective": "glm", "batch_size": 4,
             "seq_len": 64, "max_steps": 4, "eval_every": 0}  # fmt: skip
    sets = parse_set(["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=128"])
    pretrain(resolve_train_config({}, flags, sets))
    cfg = SftConfig(base=str(tmp_path / "glm"), data="chatterbot", out=str(tmp_path / "sft"), max_steps=15,
                    batch_size=4, seq_len=128, lr=3e-3, warmup_steps=2, eval_every=0, samples=2).validate()  # fmt: skip
    sft(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if "loss" in r]
    assert losses[-1] < losses[0]
