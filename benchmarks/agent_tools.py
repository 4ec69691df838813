"""Does a tiny model learn to use a calculator? SFT on tool traces vs on direct answers, scored held out.

    python benchmarks/agent_tools.py --steps 600 --json benchmarks/results/agent_tools.json

Both runs start from the same randomly initialized tiny model (4 layers, d_model 256, a 2,048-token
byte-level BPE trained on the traces) and train on the same questions for the same steps, batch and
seed (`lmforge tool-traces`):
- tools:  multi-digit multiplications (`mul-long`: 3-4 digits by 2-3 digits) answered by calling `calc`,
          list reversals (`reverse`) answered directly under the same tool listing (so it learns when);
- direct: the same questions answered directly, no tool listing.
Then on held-out questions (the tasks' eval splits, disjoint from training): the tools model runs in
`lmforge agent`'s loop with the real calculator (at most 3 model turns), the direct model answers in
one turn; both greedy. Reported: exact-answer accuracy with Wilson 95% intervals, the exact McNemar
test on the paired mul-long items, and how often the tools model called a tool on each task (it
should on mul-long and not on reverse). A 135M model (SmolLM2) trains at ~100 tokens/s on this
CPU, too slow for this budget; `--model` runs the same comparison from any model with LoRA instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def tiny_base(work: Path, texts: list[str], vocab: int = 2048) -> str:
    """A random tiny chat model with a BPE trained on `texts` (what the traces say), saved as a checkpoint."""
    import shutil

    import torch

    from lmforge.model.transformer import ModelConfig, Transformer
    from lmforge.tokenizer.special import tokenizer_hash
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train import checkpoint as ckpt

    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(texts), encoding="utf-8")
    train_tokenizer([corpus], vocab, work / "tok", heldout_fraction=0.0)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=4, d_model=256, n_head=4, max_seq_len=1024)
    run = work / "base"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(work / "tok", run / "tokenizer")
    meta = {"model_config": cfg.to_dict(),
            "tokenizer": {"dir": "../../tokenizer", "hash": tokenizer_hash(work / "tok")}}  # fmt: skip
    ckpt.save_checkpoint(run, 1, ckpt.model_tensors(Transformer(cfg).state_dict(), True), meta)
    return str(run)


def sft_run(base: str, data: str, out: str, steps: int, batch: int, seq_len: int, lr: float, lora: bool) -> dict:
    from lmforge.config import resolve
    from lmforge.train.sft import SftConfig, sft

    flags = {"base": base, "data": data, "out": out, "max_steps": steps, "batch_size": batch, "seq_len": seq_len,
             "lr": lr, "warmup_steps": 20, "eval_every": 0, "samples": 0, "val_fraction": 0.02, "ckpt_every": 0}  # fmt: skip
    if lora:
        flags |= {
            "lora": True,
            "lora_rank": 16,
            "lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        }
    t = time.perf_counter()
    result = sft(resolve(SftConfig, {}, flags, {}))
    return {"wall_s": round(time.perf_counter() - t, 1), "val_loss_before": result.get("val_loss_before"),
            "val_loss_after": result.get("val_loss_after")}  # fmt: skip


def score(model_dir: str, items: dict, use_tools: bool, max_new: int) -> list[dict]:
    from lmforge.agent.loop import Agent, Limits, model_generator
    from lmforge.agent.tools import builtin_tools
    from lmforge.align.tasks import get_task
    from lmforge.chat.template import ChatFormat
    from lmforge.train.checkpoint import load_for_inference

    model, tok_dir, _ = load_for_inference(model_dir)
    fmt = ChatFormat(tok_dir)
    gen = model_generator(model, fmt, max_new)
    agent = Agent(gen, builtin_tools(["calc"]), fmt, Limits(max_steps=3))
    rows = []
    for task_name, pairs in items.items():
        task = get_task(task_name)
        for q, a in pairs:
            if use_tools:
                result = agent.run(q)
                reply, calls = result.answer, len(result.steps)
            else:
                reply, calls = gen([{"role": "user", "content": q}]), 0
            rows.append({"task": task_name, "question": q, "answer": a, "reply": reply, "tool_calls": calls,
                         "ok": task.reward(reply, a) == 1.0})  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    from lmforge.eval.stats import wilson_interval

    out = {}
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        k, n = sum(r["ok"] for r in sub), len(sub)
        lo, hi = wilson_interval(k, n)
        out[task] = {"accuracy": round(k / n, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": n,
                     "called_a_tool": round(sum(r["tool_calls"] > 0 for r in sub) / n, 4)}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="start from this model with LoRA (default: a tiny random model)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=3000, help="training questions per task")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out mul-long questions (and half as many reverse)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from lmforge.agent.traces import ToolTracesConfig, write_traces
    from lmforge.align.tasks import get_task, make_split
    from lmforge.eval.stats import mcnemar_exact

    work = Path(args.work or tempfile.mkdtemp(prefix="agent-tools-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"settings": vars(args)}
    texts = []
    for name, direct in (("tools", False), ("direct", True)):
        path = work / f"{name}.jsonl"
        write_traces(ToolTracesConfig(tasks="mul-long,reverse", n=args.n_train, out=str(path), direct=direct))
        texts += [m["content"] for line in path.read_text().splitlines() for m in json.loads(line)["messages"]]
    base = args.model or tiny_base(work, texts)
    runs = {}
    for name in ("tools", "direct"):
        out = work / f"sft-{name}"
        if not (out / "checkpoints").exists():
            results[f"sft_{name}"] = sft_run(base, str(work / f"{name}.jsonl"), str(out), args.steps, args.batch,
                                             args.seq_len, args.lr, lora=bool(args.model))  # fmt: skip
            print(f"sft {name}: {results[f'sft_{name}']}", flush=True)
        runs[name] = str(out)
    items = {"mul-long": make_split(get_task("mul-long"), args.n_eval, split="eval"),
             "reverse": make_split(get_task("reverse"), args.n_eval // 2, split="eval")}  # fmt: skip
    rows = {}
    for name, model_dir, tools in (("tools", runs["tools"], True), ("direct", runs["direct"], False)):
        t = time.perf_counter()
        rows[name] = score(model_dir, items, tools, args.max_new_tokens)
        results[name] = {**summary(rows[name]), "wall_s": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(results[name]), flush=True)
    pairs = [(a["ok"], b["ok"]) for a, b in zip(rows["tools"], rows["direct"], strict=True) if a["task"] == "mul-long"]
    fixed = sum(a and not b for a, b in pairs)
    broken = sum(b and not a for a, b in pairs)
    results["mcnemar_mul_long"] = {"tools_only": fixed, "direct_only": broken, "p": mcnemar_exact(fixed, broken)}
    results["examples"] = {name: rows[name][:3] for name in rows}
    print(json.dumps(results["mcnemar_mul_long"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
