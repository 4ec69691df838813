"""SFT vs best-of-N vs DPO vs PPO vs GRPO on one verifiable task, same held-out prompts, with costs.

    lmforge prefs --source task:sort --n 8000 --sft --out sort_sft.jsonl
    lmforge sft --model runs/demo/sft --data sort_sft.jsonl --out runs/sort-sft --max-steps 120 --seq-len 64 \\
        --batch-size 32 --lr 2e-3                       # a partly trained starting point
    python benchmarks/alignment.py --model runs/sort-sft --task sort --out runs/align-sort --json align.json

Every method starts from `--model` and is scored on the same `--eval-prompts` held-out prompts of the
task (the eval split, never trained on) by greedy exact match, with 95% Wilson intervals:
- SFT: the starting model as is;
- best-of-N: N samples (temperature 1) per prompt, the verifier picks (an oracle upper bound, not a
  trained policy; reported at k = 1, 2, 4, 8, 16);
- reward model: trained on task pairs (correct vs perturbed answer) from the training split;
  held-out pairwise accuracy;
- DPO: on the same pairs, then greedy accuracy; plus held-out preference accuracy and margin;
- PPO and GRPO: on training prompts with the verifier's reward, then greedy accuracy; final KL.
Cost: wall time of each method's training (or sampling) and the tokens it generated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _generated(run: Path, rows_per_rollout: int, steps_per_rollout: int = 1) -> int:
    """Answer tokens sampled: each step logs its rollout's mean length (PPO: a rollout serves several steps)."""
    return int(
        sum(r["length"] * rows_per_rollout for r in _read(run) if "length" in r and "loss" in r) / steps_per_rollout
    )


def main() -> None:
    from lmforge.align.best_of_n import BestOfNConfig, best_of_n
    from lmforge.align.dpo import DpoConfig, dpo
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.align.ppo import PpoConfig, ppo
    from lmforge.align.prefs import task_pairs
    from lmforge.align.reward import RewardConfig, train_reward
    from lmforge.align.rollout import task_accuracy
    from lmforge.align.tasks import get_task, make_split
    from lmforge.chat.template import ChatFormat
    from lmforge.config import resolve
    from lmforge.fileio import atomic_write_text
    from lmforge.train.checkpoint import load_for_inference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="sort")
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rl-lr", type=float, default=1e-4)
    ap.add_argument("--rl-temperature", type=float, default=0.7, help="sampling temperature of GRPO/PPO rollouts")
    ap.add_argument("--dpo-lr", type=float, default=5e-5)
    ap.add_argument("--ppo-rollout", type=int, default=64, help="answers per PPO rollout (a multiple of 32)")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--ppo-lr", type=float, default=1e-4)
    ap.add_argument("--ppo-lam", type=float, default=0.95)
    ap.add_argument("--pair-prompts", type=int, default=2000, help="training prompts sampled for on-policy pairs")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--methods", default="bon,rm,dpo,onpolicy,grpo,ppo", help="which to run (SFT always)")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(args.task)
    items = make_split(task, args.eval_prompts, args.seed, "eval")
    rows, report = [], {"task": args.task, "eval_prompts": len(items), "model": args.model}

    def greedy(run) -> dict:
        model, tok, _ = load_for_inference(run)
        return task_accuracy(model, ChatFormat(tok), task, items, args.max_new_tokens)

    def add(method, acc, wall, generated, note=""):
        rows.append({"method": method, "accuracy": acc["accuracy"], "lo": acc["accuracy_lo"], "hi": acc["accuracy_hi"],
                     "train_s": wall, "train_tokens_generated": generated, "note": note})  # fmt: skip
        print(f"{method}: {acc['accuracy']:.3f} [{acc['accuracy_lo']:.3f}, {acc['accuracy_hi']:.3f}] "
              f"{wall:.0f}s {generated:,} tokens {note}", flush=True)  # fmt: skip

    add("SFT (start)", greedy(args.model), 0.0, 0)

    methods = set(args.methods.split(","))
    t0 = time.perf_counter()
    bon = {"curve": []}
    if "bon" in methods:
        bon = best_of_n(BestOfNConfig(model=args.model, n=args.n, task=args.task, eval_prompts=args.eval_prompts,
                                      max_new_tokens=args.max_new_tokens, report=str(out / "best_of_n"),
                                      seed=args.seed))  # fmt: skip
        report["best_of_n"] = bon
    for point in bon["curve"]:
        acc = {"accuracy": point["accuracy"], "accuracy_lo": point["lo"], "accuracy_hi": point["hi"]}
        add(f"best-of-{point['k']} (verifier picks)", acc, time.perf_counter() - t0 if point["k"] == args.n else 0.0,
            point["tokens_generated"], "oracle selection at test time")  # fmt: skip

    pairs_path = out / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in task_pairs(args.task, 4000, seed=args.seed)))
    common = {"base": args.model, "seq_len": 64, "eval_every": 0, "log_every": 1, "ckpt_every": 0, "seed": args.seed}

    if "rm" in methods:
        t0 = time.perf_counter()
        rm = train_reward(resolve(RewardConfig, {}, {**common, "data": str(pairs_path), "out": str(out / "rm")},
                                  {"max_steps": args.dpo_steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5}))  # fmt: skip
        b, a = rm["before"], rm["after"]
        report["reward_model"] = {"before": b, "after": a, "wall_s": time.perf_counter() - t0}
        print(f"reward model: held-out pairwise accuracy {b['val_accuracy']:.3f} -> {a['val_accuracy']:.3f} "
              f"[{a['val_accuracy_lo']:.3f}, {a['val_accuracy_hi']:.3f}] ({a['val_pairs']} pairs)")  # fmt: skip

    # On-policy pairs: the model's own right and wrong answers to training prompts (best-of-n --split train).
    onpolicy, pair_s, pair_tokens = out / "onpolicy_pairs.jsonl", 0.0, 0
    if "onpolicy" in methods:
        t0 = time.perf_counter()
        built = best_of_n(BestOfNConfig(model=args.model, n=8, task=args.task, eval_prompts=args.pair_prompts,
                                        split="train", temperature=args.rl_temperature, out_pairs=str(onpolicy),
                                        max_new_tokens=args.max_new_tokens, seed=args.seed))  # fmt: skip
        pair_s, pair_tokens = time.perf_counter() - t0, built["tokens_generated"]
        report["onpolicy_pairs"] = built["pairs"]
        print(f"on-policy pairs: {built['pairs']['written']} of {built['prompts']} prompts, {pair_s:.0f}s", flush=True)

    dpo_runs = [
        ("DPO (synthetic task pairs)", "dpo", pairs_path, {}, 0.0, 0),
        ("DPO (on-policy pairs)", "dpo-onpolicy", onpolicy, {}, pair_s, pair_tokens),
        ("RPO (on-policy, + NLL of chosen)", "rpo-onpolicy", onpolicy, {"sft_coef": 1.0}, pair_s, pair_tokens),
    ]
    for name, folder, data, extra, extra_s, tokens in dpo_runs:
        if (folder == "dpo" and "dpo" not in methods) or (folder != "dpo" and "onpolicy" not in methods):
            continue
        t0 = time.perf_counter()
        d = dpo(resolve(DpoConfig, {}, {**common, "data": str(data), "out": str(out / folder)},
                        {"max_steps": args.dpo_steps, "batch_size": 32, "lr": args.dpo_lr, "beta": 0.1,
                         "warmup_steps": 5, **extra}))  # fmt: skip
        wall = time.perf_counter() - t0 + extra_s
        report[folder] = {"before": d.get("before"), "after": d.get("after")}
        b, a = d["before"], d["after"]
        add(name, greedy(out / folder), wall, tokens,
            f"held-out pairs: pref. acc {b['val_pref_accuracy']:.2f}->{a['val_pref_accuracy']:.2f} "
            f"[{a['val_pref_accuracy_lo']:.2f}, {a['val_pref_accuracy_hi']:.2f}], margin "
            f"{b['val_logratio_margin']:.2f}->{a['val_logratio_margin']:.2f} ({a['val_pairs']} pairs)")  # fmt: skip

    rl = {"task": args.task, "max_new_tokens": args.max_new_tokens, "eval_prompts": 0, "batch_size": 8,
          "max_steps": args.rl_steps, "lr": args.rl_lr, "temperature": args.rl_temperature, "warmup_steps": 3, "kl_coef": 0.05, "max_kl": 0}  # fmt: skip
    if "grpo" in methods:
        t0 = time.perf_counter()
        report["grpo"] = grpo(resolve(GrpoConfig, {}, {**common, "out": str(out / "grpo")}, {**rl, "group_size": 8}))
        wall = time.perf_counter() - t0
        kl = [r["kl"] for r in _read(out / "grpo") if "kl" in r]
        add(
            "GRPO",
            greedy(out / "grpo"),
            wall,
            _generated(out / "grpo", 8 * 8),
            f"final KL {kl[-1]:.3f}, max {max(kl):.3f}",
        )

    if "ppo" in methods:
        t0 = time.perf_counter()
        ppo_rl = {**rl, "batch_size": 32, "grad_accum": args.ppo_rollout // 32, "ppo_epochs": args.ppo_epochs,
                  "lr": args.ppo_lr, "lam": args.ppo_lam}  # fmt: skip
        report["ppo"] = ppo(resolve(PpoConfig, {}, {**common, "out": str(out / "ppo")}, ppo_rl))
        wall = time.perf_counter() - t0
        kl = [r["kl"] for r in _read(out / "ppo") if "kl" in r]
        add("PPO", greedy(out / "ppo"), wall, _generated(out / "ppo", args.ppo_rollout, args.ppo_epochs),
            f"{args.ppo_rollout} answers/rollout, {args.ppo_epochs} pass(es); final KL {kl[-1]:.3f}, max {max(kl):.3f}")  # fmt: skip

    lines = ["| method | held-out accuracy | 95% CI | train/sample wall s | tokens generated | note |",
             "|---|---:|---|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['lo']:.3f}-{r['hi']:.3f} | {r['train_s']:.0f} | "
                     f"{r['train_tokens_generated']:,} | {r['note']} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    atomic_write_text(out / "comparison.md", table + "\n")
    report["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
