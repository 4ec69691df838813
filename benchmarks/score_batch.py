"""How many tokens one scoring forward should hold on this machine: `lmforge eval`'s scorer at several batch sizes.

    python benchmarks/score_batch.py --model runs/demo/sft --items 300
    python benchmarks/score_batch.py --model /tmp/smol --items 50 --rounds 2

The built-in cloze sets (chatterbot-en and chatterbot-zh, the first --items of each, 0-shot) tokenized once, then
score_pairs (lmforge/eval/scoring.py) at each --budgets (rows x longest row per forward), interleaved rounds (the order
reversed every other round), seconds, medians; the scores are checked equal across budgets. The default on a CPU is
scoring.CPU_BATCH_TOKENS.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.eval.mc import _checked_pairs, prompts_for
from lmforge.eval.scoring import score_pairs
from lmforge.eval.tasks import task_items
from lmforge.tokenizer.special import load_tokenizer
from lmforge.train.checkpoint import load_for_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", type=int, default=300, help="items per set")
    ap.add_argument("--budgets", default="8192,4096,2048,1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok_dir, _ = load_for_inference(a.model)
    tok = load_tokenizer(tok_dir)
    reqs = [
        r for name in ("chatterbot-en", "chatterbot-zh") for r in prompts_for(task_items(name, 0)[: a.items], "cloze")
    ]
    pairs = [p for r in reqs for p in _checked_pairs(tok, r, model.cfg.max_seq_len)]
    budgets = [int(b) for b in a.budgets.split(",")]
    times: dict[int, list[float]] = {b: [] for b in budgets}
    first = None
    with torch.inference_mode():
        for r in range(a.rounds):
            for b in budgets if r % 2 == 0 else budgets[::-1]:
                t = time.perf_counter()
                out = score_pairs(model, pairs, budget=b)
                times[b].append(time.perf_counter() - t)
                first = first or out
                assert max(abs(x[0] - y[0]) for x, y in zip(out, first)) < 1e-3
    print(f"{a.model}: {len(reqs)} items, {len(pairs)} choices, {a.threads} threads")
    base = statistics.median(times[budgets[0]])
    for b, v in times.items():
        med = statistics.median(v)
        print(f"  budget {b:>6}: {med:.2f} s (rounds {[round(x, 2) for x in v]}), {base / med:.2f}x the first")


if __name__ == "__main__":
    main()
