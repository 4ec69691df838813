"""Peak memory of each fine-tuning stage's defaults on a real model, activation checkpointing on and off.

    lmforge import .../SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2      # once
    python benchmarks/finetune_memory.py --model models/smollm2 --work /tmp/ftmem [--steps 2] [--json out.json]

Each run is the plain CLI command a user types (`lmforge sft|dpo|grpo|ppo --model M ...`, LoRA and
full), with every default kept except the number of steps (`--steps`), one validation micro-batch and
a few held-out prompts (so the run is short; evaluation is no-grad and smaller than a training step),
in its own process. The peak is the process's peak resident set size as the run itself records it
(`peak_rss_mb` in metrics.jsonl): what decides whether a 8 or 16 GB laptop kills it. Data: the
packaged chatterbot conversations (sft), chitchat preference pairs (dpo: `lmforge prefs --source
chitchat`), the `add` task (grpo, ppo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHORT = ["--set", "eval_batches=1", "--set", "eval_every=0"]
JOBS = {
    "sft": ["--data", "chatterbot", "--set", "samples=0"],
    "dpo": ["--data", "{pairs}"],
    "grpo": ["--task", "add", "--set", "eval_prompts=8"],
    "ppo": ["--task", "add", "--set", "eval_prompts=8"],
}


def run(model: str, job: str, mode: str, checkpointing: str, steps: int, work: Path) -> dict:
    out = work / f"{job}-{mode}-{checkpointing}"
    args = [a.replace("{pairs}", str(work / "pairs.jsonl")) for a in JOBS[job]]
    cmd = ["lmforge", job, "--model", model, "--out", str(out), "--max-steps", str(steps), *args, *SHORT,
           "--set", f"activation_checkpointing={checkpointing}", *(["--lora"] if mode == "lora" else [])]  # fmt: skip
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    steps_ = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"job": job, "mode": mode, "checkpointing": checkpointing, "command": " ".join(cmd), "wall_s": round(wall, 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in steps_), "tokens_per_s": steps_[-1]["tokens_per_s"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", default="/tmp/ftmem")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--jobs", default="sft,dpo,grpo,ppo")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--checkpointing", default="on,off", help="activation_checkpointing settings to run")
    ap.add_argument("--json", default="benchmarks/results/finetune_memory.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if "dpo" in args.jobs and not (work / "pairs.jsonl").is_file():
        subprocess.run(["lmforge", "prefs", "--source", "chitchat", "--out", str(work / "pairs.jsonl")], check=True)
    rows = []
    for job in args.jobs.split(","):
        for mode in args.modes.split(","):
            for ck in args.checkpointing.split(","):
                rows.append(run(args.model, job, mode, ck, args.steps, work))
                r = rows[-1]
                print(f"{job:5s} {mode:5s} checkpointing {ck:3s}: peak {r['peak_rss_mb']:8,.0f} MB  "
                      f"{r['tokens_per_s']:7.1f} tok/s  ({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": args.model, "steps": args.steps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
