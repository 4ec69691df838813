"""Data-parallel scaling on one machine: `lmforge pretrain` on 1 process against torchrun with N processes (gloo),
the same tokens per step, and the same run split over two torchrun "nodes" on loopback (c10d rendezvous).

    python benchmarks/ddp_scaling.py --work /tmp/ddp                 # 1 vs 2 processes, then 2 nodes x 1
    python benchmarks/ddp_scaling.py --work /tmp/ddp --procs 1,2,4 --steps 40

Data: Shakespeare's 42 works, a 4,096-token BPE (made once in --work, as benchmarks/muon_vs_adamw.py does). Each
run is `lmforge pretrain --preset tiny --seq-len 256` with 16 sequences per step in total (micro-batch 16 / N per
process), --steps steps, no validation or checkpoints in between; a single process uses every core, N
processes use cores / N threads each. Reported: the median tokens/s over the logged steps after the first 5
(the loop's own figure, all processes together), the speed-up over one process, and whether the losses equal
the single process's (they should to ~1e-5: the same rows in each step). Writes ddp_scaling.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from finetune_vs_trl import machine
from muon_vs_adamw import prepare_data

from lmforge.train.metrics import read_metrics

ARGS = ["--preset", "tiny", "--seq-len", "256", "--warmup-steps", "5", "--set", "eval_every=0",
        "--set", "ckpt_every=0", "--set", "log_every=1"]  # fmt: skip


def run(work: Path, data: Path, procs: int, steps: int, nodes: int = 1) -> dict:
    out = work / f"p{procs}-n{nodes}-s{steps}"
    per_node = procs // nodes
    cmd = ["pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
           "--batch-size", str(16 // procs), *ARGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs))}
    if procs == 1:
        subprocess.run(["lmforge", *cmd], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shown = "lmforge " + " ".join(cmd)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rdzv = (["--standalone"] if nodes == 1 else
                ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"])  # fmt: skip
        launch = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", str(per_node),
                  "-m", "lmforge", *cmd]  # fmt: skip
        agents = [subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for _ in range(nodes)]  # fmt: skip
        if any(a.wait() != 0 for a in agents):
            raise SystemExit(f"failed: {' '.join(launch)}")
        shown = " ".join(["torchrun", *rdzv, "--nproc_per_node", str(per_node), "-m", "lmforge", *cmd])
    records = [r for r in read_metrics(out) if "loss" in r]
    tps = [r["tokens_per_s"] for r in records if r["step"] > 5]
    return {"procs": procs, "nodes": nodes, "command": shown, "tokens_per_s": statistics.median(tps),
            "losses": {r["step"]: r["loss"] for r in records}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated (each divides 16)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(a.work)
    runs = [run(a.work, data, int(p), a.steps) for p in a.procs.split(",")]
    runs.append(run(a.work, data, 2, a.steps, nodes=2))  # two "nodes" of one process each
    base = runs[0]
    for r in runs:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["max_loss_diff"] = max(abs(r["losses"][s] - base["losses"][s]) for s in base["losses"])
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": machine(), "steps": a.steps,
              "runs": runs}  # fmt: skip
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "ddp_scaling.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Data-parallel scaling on one machine ({result['date']})", "",
             (f"{machine()['cpu']}, {machine()['cores']} cores; `python benchmarks/ddp_scaling.py --work /tmp/ddp "
              f"--procs {a.procs} --steps {a.steps}`; the tiny model, 16 x 256 tokens a step in total."), "",
             "| processes | nodes | tokens/s | speed-up | max loss difference vs 1 process |", "|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        lines.append(f"| {r['procs']} | {r['nodes']} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                     f"{r['max_loss_diff']:.1e} |")  # fmt: skip
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in runs]
    (a.results / "ddp_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
