"""Self-Instruct from 20 seeds with SmolLM2: what the filters remove, and whether SFT on the result moves a score.

    lmforge import .../SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2        # once
    python benchmarks/self_instruct.py --model models/smollm2 --n 60 --json benchmarks/results/self_instruct.json

1. `lmforge self-instruct` from benchmarks/data/self_instruct_seeds.jsonl (20 hand-written tasks): --n tasks,
   with every filter's count (the report).
2. `lmforge sft --lora` of the same model on them (--steps, batch 4 x 256 tokens).
3. The model before and after on `chatterbot-en` (the built-in multiple choice: which answer belongs to this
   question; the first --limit items, 0-shot cloze), acc and acc_norm with Wilson intervals, and the exact McNemar
   test on the paired items (acc_norm).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def mc_items(model: str, limit: int, out: Path) -> tuple[dict, list[bool]]:
    from lmforge.eval.eval_cmd import EvalConfig, evaluate

    report = evaluate(EvalConfig(model=model, tasks="chatterbot-en", limit=limit, out=str(out), device="cpu"))
    res = report["tasks"]["chatterbot-en"]
    items = [json.loads(line) for line in (out / "items_chatterbot-en.jsonl").read_text().splitlines()]
    return res, [bool(r["correct_norm"]) for r in items]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from lmforge.chat.self_instruct import SelfInstructConfig, run
    from lmforge.config import resolve
    from lmforge.eval.stats import mcnemar_exact
    from lmforge.train.sft import SftConfig, sft

    work = Path(args.work or tempfile.mkdtemp(prefix="self-instruct-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "generated.jsonl"
    results = {"settings": vars(args)}
    t = time.perf_counter()
    if not data.exists():
        run(SelfInstructConfig(model=args.model, seeds=str(ROOT / "data" / "self_instruct_seeds.jsonl"), n=args.n,
                               out=str(data), device="cpu"))  # fmt: skip
    results["generation"] = json.loads(Path(f"{data}.report.json").read_text())
    results["generation"]["wall_s"] = round(time.perf_counter() - t, 1)
    results["examples"] = [json.loads(line) for line in data.read_text().splitlines()[:5]]
    flags = {"base": args.model, "data": str(data), "out": str(work / "sft"), "max_steps": args.steps,
             "batch_size": 4, "seq_len": 256, "lr": 5e-4, "lora": True, "eval_every": 0, "samples": 0,
             "val_fraction": 0.1, "ckpt_every": 0, "warmup_steps": 3}  # fmt: skip
    if not (work / "sft" / "checkpoints").exists():
        sft_result = sft(resolve(SftConfig, {}, flags, {}))
        results["sft"] = {k: sft_result.get(k) for k in ("val_loss_before", "val_loss_after")}
    before, before_items = mc_items(args.model, args.limit, work / "eval-before")
    after, after_items = mc_items(str(work / "sft"), args.limit, work / "eval-after")
    fixed = sum(b and not a for a, b in zip(before_items, after_items, strict=True))
    broken = sum(a and not b for a, b in zip(before_items, after_items, strict=True))
    results["chatterbot_en"] = {"before": before, "after": after, "fixed": fixed, "broken": broken,
                                "mcnemar_p": mcnemar_exact(fixed, broken)}  # fmt: skip
    print(json.dumps({k: v for k, v in results.items() if k != "examples"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
