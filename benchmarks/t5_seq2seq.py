"""T5 against the decoder on a seq2seq task: the same corpus, the same pretraining budget, the same fine-tuning.

    python benchmarks/t5_seq2seq.py --enc-out /tmp/encoders --out /tmp/t5-seq2seq [--json results.json]

Uses `benchmarks/encoders.py`'s byte-level BPE shards (English + Chinese, vocab 8000) and its pretrained
`decoder` run (lmforge's `tiny`, 600 steps of 32 x 128 tokens). Pretrains `t5-mini` (4 + 4 layers, 256 wide) on
the same shards with span corruption for the same steps, batch and learning rate; then fine-tunes both with
`lmforge sft` on a task of stage 3 (`--task`, default `add`: `--train` questions such as "What is 72 + 98?"
answered "The answer is 170.") and scores greedy answers on `--eval` held-out questions with the task's own
checker, with 95% Wilson intervals. The decoder reads the question in its chat template; T5's encoder reads it
as its input. Fixed step counts: the figures do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    import torch

    from lmforge.align.tasks import answer_text, get_task, make_split
    from lmforge.eval.stats import wilson_interval
    from lmforge.eval.tasks import generative_result
    from lmforge.tokenizer.special import document_end_id, load_tokenizer, pad_id
    from lmforge.train.checkpoint import load_model, tokenizer_dir
    from lmforge.train.pretrain import pretrain, resolve_train_config
    from lmforge.train.sft import SftConfig, sft

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--enc-out", type=Path, required=True, help="benchmarks/encoders.py's --out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--task", default="add", help="a verifiable task of stage 3 (lmforge/align/tasks.py)")
    ap.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate")
    ap.add_argument(
        "--t5-batch",
        type=int,
        default=100,
        help="T5's pairs per step: the decoder packs ~100 of these "
        "short conversations into its 32 rows of 128 tokens, so both see about the same examples",
    )
    ap.add_argument("--models", default="decoder,t5", help="which to fine-tune: decoder, t5 or both")
    ap.add_argument("--repretrain", action="store_true", help="pretrain T5 again even if --out holds it")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    chosen = a.models.split(",")
    if not chosen or set(chosen) - {"decoder", "t5"}:
        ap.error(f"--models: decoder, t5 or both, got {a.models!r}")
    a.out.mkdir(parents=True, exist_ok=True)
    task = get_task(a.task)
    data = a.out / f"{a.task}.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": answer_text(task, ans)}) + "\n"
                            for q, ans in make_split(task, a.train, 1337, "train")))  # fmt: skip
    recipe = {"preset": "t5-mini", "batch_size": 32, "seq_len": 128, "max_steps": a.steps, "lr": 1e-3,
              "warmup_steps": 60, "eval_every": max(1, a.steps // 4), "eval_batches": 10, "ckpt_every": 0}  # fmt: skip
    if (a.out / "t5" / "checkpoints").is_dir() and not a.repretrain:
        print(f"reusing the pretrained T5 in {a.out / 't5'} (--repretrain to train it again)", file=sys.stderr)
    else:
        pretrain(resolve_train_config(recipe, {"data": str(a.enc_out / "shards-bpe"), "out": str(a.out / "t5")}, {}))
    result = {"task": a.task, "train_items": a.train, "eval_items": a.eval, "sft_steps": a.sft_steps, "lr": a.lr,
              "models": {}}  # fmt: skip
    items = make_split(task, a.eval, 1337, "eval")
    for key, name, base in (("decoder", "decoder (tiny)", a.enc_out / "decoder"), ("t5", "t5-mini", a.out / "t5")):
        if key not in chosen:
            continue
        out = a.out / f"sft-{a.task}-{name.split()[0]}"
        batch = 32 if key == "decoder" else a.t5_batch
        cfg = SftConfig(base=str(base), data=str(data), out=str(out), max_steps=a.sft_steps, batch_size=batch,
                        lr=a.lr, warmup_steps=20, eval_every=0, val_fraction=0.02, seq_len=128).validate()  # fmt: skip
        sft(cfg)
        model, ckpt, meta = load_model(out, encoder_ok=True)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        if key == "decoder":
            r = generative_result(model, tokenizer_dir(ckpt, meta), a.task, a.eval, 1337, 0, 0.0, 32)
            right = round(r["exact_match"] * r["n"])
        else:
            tok = load_tokenizer(tokenizer_dir(ckpt, meta))
            eos, pad = document_end_id(tok), pad_id(tok)
            right = 0
            for i in range(0, len(items), 50):
                chunk = items[i : i + 50]
                ids = [tok.encode(q, add_special_tokens=False).ids + [eos] for q, _ in chunk]
                src = torch.full((len(ids), max(map(len, ids))), pad)
                for j, row in enumerate(ids):
                    src[j, : len(row)] = torch.tensor(row)
                outs = model.generate(src, 32, src_mask=src != pad, start_id=pad, eos_id=eos).tolist()
                for (_, ans), o in zip(chunk, outs, strict=True):
                    o = o[: o.index(eos)] if eos in o else o
                    right += task.reward(tok.decode(o), ans) == 1.0
        lo, hi = wilson_interval(right, len(items))
        result["models"][name] = {"params": params, "batch": batch, "exact_match": round(right / len(items), 4),
                                  "lo": round(lo, 4), "hi": round(hi, 4)}  # fmt: skip
        print(f"{name}: {params / 1e6:.2f}M params, exact match {right}/{len(items)}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
