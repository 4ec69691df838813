"""Pretraining: loss falls, resume is exact after SIGTERM or kill -9, DDP on 2 processes matches 1, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.config import parse_set
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import pretrain, resolve_train_config

SMALL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=64", "warmup_steps=2",
         "log_every=1", "eval_batches=2", "lr=3e-3"]  # fmt: skip


def config(shards, out, *sets, **flags):
    flags = {"data": str(shards), "out": str(out), "batch_size": 4, "seq_len": 64, **flags}
    return resolve_train_config({}, flags, parse_set(list(SMALL) + list(sets)))


def cli(*args, check=True, env=None, **kw):
    proc = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, **kw)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_loss_falls_and_run_is_self_describing(small_shards, tmp_path):
    last = pretrain(config(small_shards, tmp_path / "run", "eval_every=20", max_steps=40))
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    assert losses[0] > 5.5  # about ln(512) = 6.24 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 0.7
    assert vals and vals[-1]["val_loss"] < vals[0]["val_loss"] + 1e-6 and vals[-1]["val_bpb"] > 0
    assert last["step"] == 40
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000040"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 40 and meta["model_config"]["n_layer"] == 2 and meta["loader"]["position"] > 0
    assert (tmp_path / "run" / "config.yaml").is_file() and (
        tmp_path / "run" / "tokenizer" / "tokenizer.json"
    ).is_file()
    assert any((tmp_path / "run" / "tb").iterdir())  # TensorBoard events


def val_losses(run_dir):
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def _args(shards, out, steps):
    sets = [a for s in SMALL + ["ckpt_every=3", "eval_every=5"] for a in ("--set", s)]
    return ["pretrain", "--data", shards, "--out", out, "--batch-size", 4, "--seq-len", 64, "--max-steps", steps, *sets]


SLOW_STEPS = (
    "import sys, time; import lmforge.train.loop as L; f = L._accumulate; "
    "L._accumulate = lambda *a: (time.sleep(0.1), f(*a))[1]; "
    "from lmforge.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_resume_is_exact(small_shards, tmp_path, how):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    cli(*_args(small_shards, ref, 12))
    # The interrupted run sleeps 0.1 s a step (a patch in the child only), so the signal lands mid-run
    # however fast the machine: at full speed all 12 steps can finish before the test sees step 3.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *map(str, _args(small_shards, cut, 12))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(cut / "checkpoints" / "step_00000003" / "meta.json", proc)
    proc.send_signal(how)
    proc.wait(timeout=120)
    if how != signal.SIGKILL:  # checkpoint written, then 128 + the signal, as shells expect: `&& next stage` stops
        err = proc.stderr.read()
        assert proc.returncode == 128 + how.value and f"stopped by {how.name}" in err, err[-2000:]
    stopped_at = max(int(p.name[5:]) for p in (cut / "checkpoints").glob("step_*") if (p / "meta.json").exists())
    assert 3 <= stopped_at < 12
    cli(*_args(small_shards, cut, 12))
    assert train_losses(cut) == train_losses(ref)  # to the last digit
    assert val_losses(cut) == val_losses(ref)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(small_shards, tmp_path, parallel):
    sets = [a for s in SMALL + [f"parallel={parallel}"] for a in ("--set", s)]
    common = ["--data", small_shards, "--seq-len", 64, "--max-steps", 6, *sets]
    cli("pretrain", "--out", tmp_path / "one", "--batch-size", 4, *common)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge",
         "pretrain", "--out", str(tmp_path / "two"), "--batch-size", "2", *map(str, common)],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-4, abs=1e-5)


def test_bad_inputs_one_line_exit_2(small_shards, tmp_path):
    run = tmp_path / "run"
    cli(*_args(small_shards, run, 3))
    # A resume with a different model shape.
    p = cli(*_args(small_shards, run, 6), "--set", "model.n_layer=3", check=False)
    assert p.returncode == 2 and "model.n_layer" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # Dimensions that don't divide.
    p = cli(*_args(small_shards, tmp_path / "x", 3), "--set", "model.n_head=5", check=False)
    assert p.returncode == 2 and "n_head" in p.stderr and not (tmp_path / "x" / "checkpoints").exists()
    # Unknown config field.
    p = cli(*_args(small_shards, tmp_path / "x", 3), "--set", "model.n_layers=5", check=False)
    assert p.returncode == 2 and "unknown config field 'model.n_layers' (did you mean 'model.n_layer'?)" in p.stderr
    # A truncated checkpoint.
    weights = run / "checkpoints" / "step_00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    p = cli(*_args(small_shards, run, 6), check=False)
    assert p.returncode == 2 and "model.safetensors" in p.stderr and "Traceback" not in p.stderr
    # Shards that are not shards.
    p = cli(*_args(tmp_path, tmp_path / "y", 3), check=False)
    assert p.returncode == 2 and "index.json" in p.stderr


def test_unreachable_process_group_is_one_line_error(small_shards, tmp_path):
    """A rank whose rendezvous address nobody serves (a node that never started, a wrong endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nobody listens there
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    p = cli(*_args(small_shards, tmp_path / "run", 3), "--set", "dist_timeout_s=1", "--device", "cpu", check=False,
            env=env)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        f"lmforge: error: cannot reach the process group's store at 127.0.0.1:{port} as rank 1 of 2 within 1 s (is "
        + "the rendezvous endpoint reachable and every node started? see README: from laptop to cluster)"
    ]


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_asked_where_there_is_none_is_one_line_error(small_shards, tmp_path):
    p = cli(*_args(small_shards, tmp_path / "run", 3), "--device", "mps", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["lmforge: error: device 'mps' requested, but MPS is not available here"]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_time_budget_exits_0_and_says_rerun_resumes(small_shards, tmp_path, capsys):
    from lmforge.cli import main

    assert main([*map(str, _args(small_shards, tmp_path / "run", 12)), "--max-seconds", "1e-9"]) == 0
    err = capsys.readouterr().err
    assert "stopped at the time budget" in err and "rerun the same command to resume" in err


def test_vocab_size_comes_from_the_tokenizer_unless_set(small_shards, tmp_path):
    from lmforge.errors import LmforgeError

    def vocab(run):
        return json.loads((max((run / "checkpoints").glob("step_*")) / "meta.json").read_text())["model_config"][
            "vocab_size"]  # fmt: skip

    # Unset: the tokenizer's 512 rounded up to 64, not the `tiny` preset's 8192 (a preset is not the user's choice).
    pretrain(config(small_shards, tmp_path / "default", max_steps=1))
    assert vocab(tmp_path / "default") == 512
    pretrain(config(small_shards, tmp_path / "more", "model.vocab_size=1000", max_steps=1))  # honoured: extra rows
    assert vocab(tmp_path / "more") == 1000
    with pytest.raises(LmforgeError, match=r"model.vocab_size=300 is smaller than the 512 tokens"):
        pretrain(config(small_shards, tmp_path / "less", "model.vocab_size=300", max_steps=1))
    assert not (tmp_path / "less").exists()
    # Set in a recipe counts too.
    cfg = resolve_train_config({"model": {"vocab_size": 100}}, {"data": str(small_shards), "out": str(tmp_path / "r"),
                               "batch_size": 4, "seq_len": 64}, parse_set(SMALL))  # fmt: skip
    with pytest.raises(LmforgeError, match="model.vocab_size=100"):
        pretrain(cfg)
    p = cli(*_args(small_shards, tmp_path / "cli", 1), "--set", "model.vocab_size=8", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "512" in p.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["lrr=0.1"], "unknown config field 'lrr' (did you mean 'lr'?)"),
        (["model.pos_encodin=alibi"], "unknown config field 'model.pos_encodin' (did you mean 'model.pos_encoding'?)"),
        (["pos_encoding=alibi"], "unknown config field 'pos_encoding' (did you mean 'model.pos_encoding'?)"),
        (["zzzz=1"], "unknown config field 'zzzz'"),  # nothing close: no guess
    ],
)
def test_unknown_config_field_suggests_the_closest(sets, message):
    from lmforge.align.dpo import DpoConfig
    from lmforge.config import resolve
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError) as e:
        resolve_train_config({}, {}, parse_set(sets))
    assert str(e.value) == message
    with pytest.raises(LmforgeError) as e:  # a recipe key of a fine-tuning stage goes through the same function
        resolve(DpoConfig, {"lora_rnak": 4}, {}, {})
    assert str(e.value) == "unknown config field 'lora_rnak' (did you mean 'lora_rank'?)"


def test_unknown_key_in_a_config_file_suggests_the_closest(tmp_path):
    from lmforge.config import load_config_file
    from lmforge.errors import LmforgeError

    (tmp_path / "c.yaml").write_text("stepz: []\n")
    with pytest.raises(LmforgeError, match=r"unknown key\(s\) stepz \(did you mean 'steps'\?\)"):
        load_config_file(tmp_path / "c.yaml", {"steps", "seed"}, "a `steps` list")


def test_nan_loss_stops_naming_the_step(small_shards, tmp_path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=r"loss is (nan|inf) at step \d+"):
        pretrain(config(small_shards, tmp_path / "run", "lr=1e30", "grad_clip=0", "warmup_steps=0", max_steps=3))


def test_init_from_grows_vocabulary_after_tokenizer_extend(small_shards, small_corpus, tmp_path):
    """Continued pretraining with an extended tokenizer keeps the old embedding rows, new ones start at their mean."""
    import torch

    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.extend import extend_tokenizer
    from lmforge.train.checkpoint import load_tensors, resolve_checkpoint
    from tests.tok_helpers import chinese_docs

    base_run = tmp_path / "base"
    pretrain(config(small_shards, base_run, max_steps=2))
    zh = tmp_path / "zh.jsonl"
    zh.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chinese_docs(80)))
    extend_tokenizer(base_run / "tokenizer", [zh], 100, tmp_path / "tok_zh")
    tokenize_corpus([small_corpus, zh], tmp_path / "tok_zh", tmp_path / "shards_zh", workers=1, progress=False)
    grown = tmp_path / "grown"
    pretrain(config(tmp_path / "shards_zh", grown, "model.n_layer=5", max_steps=1, init_from=str(base_run)))
    old = load_tensors(resolve_checkpoint(base_run) / "model.safetensors")["embed_tokens.weight"]
    new = load_tensors(resolve_checkpoint(grown) / "model.safetensors")["embed_tokens.weight"]
    assert new.shape[0] > old.shape[0] and new.shape[1] == old.shape[1]
    meta = json.loads((resolve_checkpoint(grown) / "meta.json").read_text())
    assert meta["model_config"]["n_layer"] == 2  # the init checkpoint's config wins over the preset/overrides
    assert torch.allclose(new[: old.shape[0]], old, atol=0.05)  # one small step away from the old rows
    # A tokenizer that is not an extension of the checkpoint's is refused.
    from lmforge.errors import LmforgeError
    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer([zh], 300, tmp_path / "other_tok")
    tokenize_corpus([zh], tmp_path / "other_tok", tmp_path / "other", workers=1, progress=False)
    with pytest.raises(LmforgeError, match="nor an extension"):
        pretrain(config(tmp_path / "other", tmp_path / "bad", max_steps=1, init_from=str(base_run)))


def test_smaller_micro_batch_keeps_the_sequences_per_step():
    from lmforge.train.common import smaller_micro_batch

    assert [smaller_micro_batch(b) for b in (16, 12, 6, 5, 2, 1)] == [8, 6, 3, 1, 1, None]


@pytest.mark.parametrize(
    "saved, saved_world, asked, world, expect",
    [
        ((4, 1), 2, (4, 1), 2, (4, 1)),  # same world, same split
        ((2, 2), 2, (4, 1), 2, (2, 2)),  # same world: the checkpoint's (refitted) split wins
        ((2, 1), 2, (2, 1), 1, (2, 2)),  # 2 -> 1: 4 sequences, micro-batch capped at the asked 2
        ((4, 1), 1, (4, 1), 2, (2, 1)),  # 1 -> 2: 2 per process
        ((3, 2), 4, (8, 1), 3, (8, 1)),  # 24 sequences on 3: 8 each in one micro-batch
        ((3, 2), 4, (5, 1), 3, (4, 2)),  # ... micro-batch at most 5: the largest divisor of 8 below it
    ],
)
def test_resume_keeps_the_sequences_per_step_on_another_world_size(saved, saved_world, asked, world, expect):
    from lmforge.train.common import adopt_saved_batch_split

    cfg = config("d", "o", batch_size=asked[0], grad_accum=asked[1])
    got = adopt_saved_batch_split(cfg, {"batch_size": saved[0], "grad_accum": saved[1]}, "ckpt", saved_world, world)
    assert (got.batch_size, got.grad_accum) == expect
    assert got.batch_size * got.grad_accum * world == saved[0] * saved[1] * saved_world


def test_resume_on_a_world_size_that_does_not_divide_is_an_error():
    from lmforge.errors import LmforgeError
    from lmforge.train.common import adopt_saved_batch_split

    with pytest.raises(LmforgeError, match="cannot resume on 3 processes: the run takes 4 sequences per step"):
        adopt_saved_batch_split(config("d", "o"), {"batch_size": 2, "grad_accum": 1}, "ckpt", 2, 3)


def _oom_above(monkeypatch, limit: int) -> list[int]:
    """Training forwards on more than `limit` rows raise torch.OutOfMemoryError, as a full GPU does."""
    import torch

    from lmforge.model.transformer import Transformer

    real, tried = Transformer.forward, []

    def forward(self, idx, *args, **kwargs):
        if self.training and idx.shape[0] > limit:
            tried.append(idx.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", forward)
    return tried


def test_out_of_memory_shrinks_the_micro_batch_and_the_same_command_resumes(
    small_shards, tmp_path, monkeypatch, capsys
):
    ref, fit = tmp_path / "ref", tmp_path / "fit"
    pretrain(config(small_shards, ref, "grad_accum=4", max_steps=4, batch_size=2))
    tried = _oom_above(monkeypatch, 2)
    pretrain(config(small_shards, fit, max_steps=2, batch_size=8))
    assert tried == [8, 4]  # then 2 fits
    assert "using micro-batch 2 x 4 accumulation (the same 8 sequences per step)" in capsys.readouterr().err
    meta = json.loads((fit / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["train_config"]["batch_size"], meta["train_config"]["grad_accum"]) == (2, 4)
    assert "batch_size: 2" in (fit / "config.yaml").read_text()
    # The original command again: resumes with the split that fit, and the run is the one a 2 x 4 run gives.
    pretrain(config(small_shards, fit, max_steps=4, batch_size=8))
    assert "resuming with the checkpoint's micro-batch 2 x 4" in capsys.readouterr().err
    assert train_losses(fit) == train_losses(ref)
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=r"cannot resume: 8 sequences per step .* but 4 now"):
        pretrain(config(small_shards, fit, max_steps=6, batch_size=4))


def test_out_of_memory_at_micro_batch_1_is_a_one_line_error(small_shards, tmp_path, monkeypatch):
    from lmforge.errors import LmforgeError

    _oom_above(monkeypatch, 0)
    with pytest.raises(LmforgeError) as e:
        pretrain(config(small_shards, tmp_path / "run", max_steps=2, batch_size=2))
    assert str(e.value) == (
        "out of memory on cpu at step 1 with micro-batch 1 x seq_len 64: lower seq_len, or use LoRA, freeze or FSDP "
        "(CUDA out of memory. Tried to allocate 2.00 GiB (simulated))"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_activation_checkpointing_gives_the_same_run_and_peak_memory_is_logged(small_shards, tmp_path, capsys):
    """`activation_checkpointing=on` recomputes activations in backward: the same losses to the bit (dropout
    included: its RNG state is replayed); every metrics record carries the peak memory, the run's last line too."""
    runs = {}
    for setting in ("off", "on"):
        pretrain(config(small_shards, tmp_path / setting, f"activation_checkpointing={setting}", "model.dropout=0.1",
                        "eval_every=0", max_steps=6))  # fmt: skip
        runs[setting] = train_losses(tmp_path / setting)
        assert f"(activation checkpointing {setting})" in capsys.readouterr().err
    assert runs["on"] == runs["off"]
    records = [r for r in read_metrics(tmp_path / "on") if "loss" in r]
    assert all(r["peak_rss_mb"] > 10 for r in records)
    with pytest.raises(Exception, match="activation_checkpointing must be auto, on or off"):
        config(small_shards, tmp_path / "x", "activation_checkpointing=sometimes")


def test_activation_checkpointing_auto_follows_model_size():
    from lmforge.model.transformer import ModelConfig, Transformer
    from lmforge.train.common import set_activation_checkpointing

    small = Transformer(ModelConfig(vocab_size=320, n_layer=2, d_model=64, n_head=4, max_seq_len=64))
    assert set_activation_checkpointing(small, "auto")[0] is False and not small.checkpointing
    assert set_activation_checkpointing(small, "on")[0] is True and small.checkpointing
    with torch.device("meta"):  # SmolLM2's size without allocating it
        from lmforge.model.presets import preset

        big = Transformer(preset("smollm2-135m"))
    on, size = set_activation_checkpointing(big, "auto")
    assert on and size > 100e6


def test_muon_trains_and_resumes_exactly(small_shards, tmp_path):
    """optimizer=muon: Muon on the blocks' matrices, AdamW on the rest; the loss falls, and a run stopped after its
    first step resumes (both optimizers' state from the checkpoint) into the very losses of a straight run."""
    from safetensors import safe_open

    straight = pretrain(config(small_shards, tmp_path / "a", "optimizer=muon", max_steps=8))
    losses = train_losses(tmp_path / "a")
    assert losses[8] < losses[1] - 0.1 and straight["step"] == 8
    pretrain(config(small_shards, tmp_path / "b", "optimizer=muon", "max_seconds=1e-9", max_steps=8))
    pretrain(config(small_shards, tmp_path / "b", "optimizer=muon", max_steps=8))
    assert train_losses(tmp_path / "b") == losses
    with safe_open(str(tmp_path / "a" / "checkpoints" / "step_00000008" / "state.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".momentum_buffer") and k.startswith("optim.0:") for k in keys)  # Muon's
    assert any(k.endswith(".exp_avg_sq") and k.startswith("optim.1:") for k in keys)  # AdamW's
    # AdamW alone from the same start: a different run (Muon is really in use).
    pretrain(config(small_shards, tmp_path / "c", max_steps=2))
    assert train_losses(tmp_path / "c")[2] != losses[2]


def test_muon_with_fsdp_is_a_config_error(small_shards, tmp_path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="optimizer=muon needs whole matrices"):
        config(small_shards, tmp_path / "x", "optimizer=muon", "parallel=fsdp")


def test_a_checkpoint_older_than_a_model_field_resumes(small_shards, tmp_path):
    """A field added to ModelConfig after a checkpoint was written was at its default then: the run resumes."""
    pretrain(config(small_shards, tmp_path / "run", max_steps=2, eval_every=0))
    meta_path = max((tmp_path / "run" / "checkpoints").glob("step_*")) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("family", "block_positions", "n_experts"):
        del meta["model_config"][key]
    for key in ("objective", "sentence_task"):
        del meta["train_config"][key]
    meta_path.write_text(json.dumps(meta))
    last = pretrain(config(small_shards, tmp_path / "run", max_steps=4, eval_every=0))
    assert last["step"] == 4
