"""Scale on CPU (gloo): a run resumes on another number of processes (2 -> 1, 1 -> 2; DDP and FSDP) with the losses
of a run never interrupted, and two torchrun "nodes" on loopback (c10d rendezvous) give the losses of one node with
as many processes, for pretrain and SFT; BERT's masked LM and T5's span corruption on two processes give the losses
of one. Every test launches torchrun: the slow tier."""

import json
import os
import socket
import subprocess
import sys

import pytest

from lmforge.train.metrics import read_metrics

pytestmark = pytest.mark.slow

# A constant LR after warmup (min_lr_ratio=1), so a run stopped at step 3 and resumed to 6 follows the schedule of a
# run to 6 (a cosine over max_steps would differ before the stop).
PRETRAIN = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=64", "warmup_steps=2",
            "log_every=1", "eval_batches=2", "lr=3e-3", "min_lr_ratio=1", "eval_every=0"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def lmforge(nproc: int, *args, check=True):
    """`lmforge ARGS` as one process, or under torchrun with `nproc` processes on this machine."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    launch = [sys.executable, "-m", "lmforge"] if nproc == 1 else [*torchrun, "-m", "lmforge"]
    proc = subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, check=False, env=ENV,
                          timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def two_nodes(*args):
    """`lmforge ARGS` on two torchrun "nodes" of 2 processes each, meeting at a c10d rendezvous on loopback."""
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "lmforge-test", "-m", "lmforge"]  # fmt: skip
    nodes = [subprocess.Popen([*launch, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=ENV) for _ in range(2)]  # fmt: skip
    errs = [node.communicate(timeout=600)[1] for node in nodes]
    for node, err in zip(nodes, errs, strict=True):
        assert node.returncode == 0, err[-3000:]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_losses(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for step, loss in a.items():
        assert loss == pytest.approx(b[step], rel=1e-4, abs=1e-5), step


def _pretrain(shards, out, steps, batch_size, *sets):
    return ["pretrain", "--data", shards, "--out", out, "--seq-len", 64, "--batch-size", batch_size,
            "--max-steps", steps, *_sets(PRETRAIN + list(sets))]  # fmt: skip


@pytest.mark.parametrize(
    "first, then",
    [((2, "ddp"), (1, "ddp")), ((2, "fsdp"), (1, "ddp")), ((1, "ddp"), (2, "fsdp"))],
    ids=["ddp2-to-1", "fsdp2-to-1", "1-to-fsdp2"],
)
def test_pretrain_resumes_on_another_number_of_processes(small_shards, tmp_path, first, then):
    """4 sequences per step throughout: `--batch-size` is per process, as users write it for each launch; the
    resumed run keeps the checkpoint's 4 (on 1 process from `--batch-size 2`: micro-batch 2 x 2 accumulation)."""
    lmforge(1, *_pretrain(small_shards, tmp_path / "ref", 6, 4))
    (n1, par1), (n2, par2) = first, then
    lmforge(n1, *_pretrain(small_shards, tmp_path / "cut", 3, 4 // n1, f"parallel={par1}"))
    resumed = lmforge(n2, *_pretrain(small_shards, tmp_path / "cut", 6, 2, f"parallel={par2}"))
    assert f"resuming a run of {n1} process(es) on {n2}" in resumed.stderr
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == n2 and meta["loader"]["position"] == 6 * 4 * 64
    assert_same_losses(losses(tmp_path / "cut"), losses(tmp_path / "ref"))


def test_resume_whose_sequences_do_not_split_is_one_line_error(small_shards, tmp_path):
    lmforge(1, *_pretrain(small_shards, tmp_path / "run", 2, 3))
    proc = lmforge(2, *_pretrain(small_shards, tmp_path / "run", 4, 3), check=False)
    assert proc.returncode != 0
    assert "cannot resume on 2 processes: the run takes 3 sequences per step" in proc.stderr


def test_two_nodes_match_one_node_pretrain(small_shards, tmp_path):
    lmforge(4, *_pretrain(small_shards, tmp_path / "one", 4, 1))
    two_nodes(*_pretrain(small_shards, tmp_path / "two", 4, 1))
    assert_same_losses(losses(tmp_path / "two"), losses(tmp_path / "one"))


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {i % 37} twice"},
                          {"role": "assistant", "content": f"{i % 37} {i % 37}"}]} for i in range(200)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(base, data, out, steps, batch_size):
    sets = ["warmup_steps=2", "log_every=1", "eval_every=0", "samples=0", "min_lr_ratio=1", "val_fraction=0.1"]
    return ["sft", "--model", base, "--data", data, "--out", out, "--seq-len", 64, "--batch-size", batch_size,
            "--max-steps", steps, "--lr", "3e-3", *_sets(sets)]  # fmt: skip


def test_two_nodes_match_one_node_sft(base_run, chats, tmp_path):
    lmforge(4, *_sft(base_run, chats, tmp_path / "one", 4, 1))
    two_nodes(*_sft(base_run, chats, tmp_path / "two", 4, 1))
    assert_same_losses(losses(tmp_path / "two"), losses(tmp_path / "one"))


def test_sft_resumes_on_one_process_after_two(base_run, chats, tmp_path):
    """Two processes with micro-batch 2 each, then one with 2 x 2 accumulation: the same rows per step and the same
    mean of per-micro-batch means."""
    lmforge(2, *_sft(base_run, chats, tmp_path / "ref", 6, 2))
    lmforge(2, *_sft(base_run, chats, tmp_path / "cut", 3, 2))
    lmforge(1, *_sft(base_run, chats, tmp_path / "cut", 6, 2))
    assert_same_losses(losses(tmp_path / "cut"), losses(tmp_path / "ref"))


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoder_objectives_on_two_processes_resume_on_one(wp_data, small_shards, tmp_path, family):
    """Masks, sentence pairs and spans are drawn per row from where it starts in the stream, so two processes with
    micro-batch 2, stopped and resumed on one with 2 x 2 accumulation, train on the batches of a run on two."""
    data, model = (wp_data[1], ["--preset", "bert-mini", "--sentence-task", "sop"]) if family == "bert" else (
        small_shards, ["--preset", "t5-mini"])  # fmt: skip

    def run(out, steps):
        return [*_pretrain(data, out, steps, 2, "model.dropout=0.0"), *model]

    lmforge(2, *run(tmp_path / "ref", 6))
    lmforge(2, *run(tmp_path / "cut", 3))
    resumed = lmforge(1, *run(tmp_path / "cut", 6))
    assert "resuming a run of 2 process(es) on 1" in resumed.stderr
    assert_same_losses(losses(tmp_path / "cut"), losses(tmp_path / "ref"))
