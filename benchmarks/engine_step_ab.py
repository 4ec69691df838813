"""Two checkouts' serving-engine step, A/B in one process: the engine of each, alternating in short blocks.

    git worktree add /tmp/base HEAD~1           # the code before a change
    python benchmarks/engine_step_ab.py --base /tmp/base --model runs/demo/sft --rows 1,13,16

On a shared machine whose speed drifts from minute to minute, runs of two versions minutes apart compare the
machine's moods as much as the code; here both versions are loaded into one process (each its own copy of the
`lmforge` modules, C kernels included) and step the same work in turn, `--blocks` times, so each pair of blocks
sees the same machine. Each block: `--rows` requests of `--prompt` distinct token ids, prefilled, then greedy decoding
of `--tokens` tokens each, all in one engine (what `lmforge serve` steps at that many clients, without HTTP); the
figure is CPU time per step (process time, one torch thread unless `--threads`). Printed: each version's median
and the median over pairs of base / new (above 1: the working tree is faster).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parents[1])


def load(root: str):
    """The engine and checkpoint modules of the lmforge under `root`, imported apart from any other copy."""
    for name in [k for k in sys.modules if k == "lmforge" or k.startswith("lmforge.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        checkpoint = importlib.import_module("lmforge.train.checkpoint")
        engine = importlib.import_module("lmforge.serve.engine")
    finally:
        sys.path.remove(root)
    assert engine.__file__.startswith(root), f"{engine.__file__} is not under {root}"
    return checkpoint, engine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="another checkout of lmforge (e.g. a git worktree of the base)")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", default="1,13,16", help="running requests per block (comma-separated: one A/B each)")
    p.add_argument("--prompt", type=int, default=30, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=16, help="tokens decoded per request in a block")
    p.add_argument("--blocks", type=int, default=20, help="blocks per version")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sides = {}
    for name, root in (("base", str(Path(args.base).resolve())), ("new", HERE)):
        checkpoint, engine = load(root)
        model, _, _ = checkpoint.load_for_inference(args.model, device=torch.device("cpu"))
        sides[name] = engine, engine.Engine(model, max_batch=64, max_context=min(256, model.cfg.max_seq_len))

    def block(name: str, rows: int, tokens: int) -> float:
        mod, eng = sides[name]
        V = eng.model.cfg.vocab_size
        for i in range(rows):
            prompt = [(5 + i + j) % V for j in range(args.prompt)]
            eng.submit(mod.Request(prompt, mod.Sampling(max_tokens=tokens, temperature=0), lambda *_: None))
        steps, t0 = 0, time.process_time()
        while eng.step():
            steps += 1
        return (time.process_time() - t0) / steps * 1e3

    for rows in [int(r) for r in args.rows.split(",")]:
        for name in sides:
            block(name, rows, 4)  # warm-up
        times = {name: [] for name in sides}
        for b in range(args.blocks):
            for name in sorted(sides, reverse=b % 2 == 1):  # which goes first alternates too
                times[name].append(block(name, rows, args.tokens))
        ratio = statistics.median(x / y for x, y in zip(times["base"], times["new"]))
        print(f"rows {rows}: base {statistics.median(times['base']):.3f} ms/step, new "
              f"{statistics.median(times['new']):.3f} ms/step (medians of {args.blocks}); base / new {ratio:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
