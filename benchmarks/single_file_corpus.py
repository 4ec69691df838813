"""A one-file corpus trains and validates like the same text in many files (issue: "a plain-text file is a
stream of documents, not one").

    python benchmarks/single_file_corpus.py --out /tmp/single-file [--steps 320] [--json result.json]

Shakespeare's 42 works, as 42 `.txt` files and as one `input.txt` (their concatenation, nanoGPT's layout),
tokenized with the same tokenizer (trained once on the 42 files, vocab 4096) and pretrained with the demo's
settings (tiny preset, batch 16 x 256, lr 2e-3, 30 warmup steps, `--steps` steps, seed 1337): each run
validates on its own val split (5% of each input's documents, `lmforge/data/holdout.py`). Before the
split, `input.txt` was one document, had no val split, and its run never validated. Prints both validation
curves (loss and bits per byte) side by side and writes a PNG beside `--json` (or in `--out`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r for r in rows if "val_loss" in r]


def main() -> None:
    from lmforge.data.corpora import shakespeare_files
    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.pretrain import pretrain, resolve_train_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    files = shakespeare_files()
    args.out.mkdir(parents=True, exist_ok=True)
    single = args.out / "input.txt"
    if not single.is_file():
        single.write_text("".join(p.read_text(encoding="utf-8") for p in files), encoding="utf-8")
    tok = args.out / "tok"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(files, 4096, tok)
    result = {}
    for name, inputs in (("42 files", files), ("one input.txt", [single])):
        slug = "many" if name == "42 files" else "one"
        shards, run = args.out / f"shards-{slug}", args.out / f"run-{slug}"
        if not (shards / "index.json").is_file():
            tokenize_corpus(inputs, tok, shards, val_fraction=0.05, progress=False)
        index = json.loads((shards / "index.json").read_text())
        recipe = {"preset": "tiny", "batch_size": 16, "seq_len": 256, "max_steps": args.steps, "lr": 0.002,
                  "warmup_steps": 30, "eval_every": args.eval_every, "eval_batches": 8, "ckpt_every": 0}  # fmt: skip
        pretrain(resolve_train_config(recipe, {"data": str(shards), "out": str(run)}, {}))
        val = index["splits"]["val"]
        result[name] = {
            "val_docs": sum(e["num_docs"] for e in val), "val_tokens": sum(e["num_tokens"] for e in val),
            "curve": [{"step": r["step"], "val_loss": round(r["val_loss"], 4), "val_bpb": round(r["val_bpb"], 4)}
                      for r in _curve(run)],
        }  # fmt: skip
    a, b = result["42 files"], result["one input.txt"]
    print(f"val split: 42 files {a['val_docs']} docs / {a['val_tokens']:,} tokens; "
          f"one file {b['val_docs']} docs / {b['val_tokens']:,} tokens\n")  # fmt: skip
    print("| step | val loss, 42 files | val loss, one file | bpb, 42 files | bpb, one file |")
    print("|---:|---:|---:|---:|---:|")
    for x, y in zip(a["curve"], b["curve"]):
        print(f"| {x['step']} | {x['val_loss']:.3f} | {y['val_loss']:.3f} | {x['val_bpb']:.3f} | {y['val_bpb']:.3f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in result.items():
        ax.plot([p["step"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (its own val split)")
    ax.set_title("Shakespeare: 42 files vs one input.txt")
    ax.legend()
    png = args.json.with_suffix(".png") if args.json else args.out / "single_file_corpus.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    print(f"\nplot: {png}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
