"""LoRA vs bottleneck adapters vs full fine-tuning of a real model on CPU: trainable share, peak memory, speed,
held-out loss.

    lmforge import .../SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2      # once
    python benchmarks/sft_lora.py --model models/smollm2 --steps 30 --json out.json
    python benchmarks/sft_lora.py --model models/smollm2 --modes lora,adapter,adapter64   # leave out full

Each mode runs `lmforge sft` in its own fresh process (so peak RSS is that mode's alone) on the
same data, split, steps and batch: the packaged chitchat conversations by default, 5% held out.
Modes: `lora` (--lora, rank --rank on q/k/v/o), `adapter` (--adapter, Houlsby bottlenecks after attention
and MLP, width --adapter-size; 0 = the width whose parameter count is closest to the LoRA run's),
`adapter64` (--adapter at the default width 64) and `full`. Speed is the median tokens/s of the
training steps after the first (from metrics.jsonl, logged every step).
Memory is reported two ways: the child's peak RSS (getrusage: weights, gradients, AdamW moments,
activations, and the interpreter), measured with glibc's mmap threshold pinned at 128 KiB
(MALLOC_MMAP_THRESHOLD_) so freed activations go back to the OS instead of piling up in the heap
(with glibc's adaptive default, RSS grew ~600 MB a step here whatever the mode); and the training
state alone, computed from tensor sizes: fp32 weights + gradients and AdamW's two moments of the
trainable parameters. The held-out loss is the mean loss on assistant tokens of the held-out
conversations, before the first step and after the last. Finally the LoRA run's adapter is
checked: logits of the merged model equal those of base + unmerged adapter; and the adapter run's:
`load_for_inference` (unmerged bottleneck layers) equals base + adapter applied by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from lmforge.config import resolve
from lmforge.train.sft import SftConfig, sft
flags = json.loads(sys.argv[1])
t0 = time.perf_counter()
result = sft(resolve(SftConfig, {}, flags, {}))
result["wall_s"] = time.perf_counter() - t0
with open(flags["out"] + "/metrics.jsonl") as f:
    result["step_tokens_per_s"] = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r]
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["state_mb"] = (4 * result["total_params"] + 12 * result["trainable_params"]) / 2**20
print("RESULT " + json.dumps(result))
"""


def run_mode(flags: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(flags)], capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode != 0:
        sys.exit(f"sft failed ({flags['out']}):\n{proc.stderr[-2000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["tokens_per_s"] = statistics.median(result["step_tokens_per_s"][1:] or result["step_tokens_per_s"])
    return result


def matched_adapter_size(model_dir: str, rank: int) -> int:
    """The bottleneck width m whose adapters (2 per layer: 2 d m + m + d parameters each) come closest in count to
    sft's default LoRA (rank `rank` on its default targets) on this model."""
    import torch

    from lmforge.model.lora import apply_lora
    from lmforge.model.transformer import ModelConfig, Transformer
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.finetune import FinetuneConfig

    cfg = ModelConfig.from_dict(ckpt.read_meta(ckpt.resolve_checkpoint(model_dir))["model_config"])
    with torch.device("meta"):  # shapes only, no weights
        model = Transformer(cfg)
    apply_lora(model, FinetuneConfig(lora_rank=rank).lora_config)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return max(1, round((lora / (2 * cfg.n_layer) - cfg.d_model) / (2 * cfg.d_model + 1)))


def loaded_equals_by_hand(run_dir: str) -> float:
    """Max |logits(load_for_inference) - logits(base + adapter applied by hand)|: a LoRA run is loaded merged, a
    bottleneck-adapter run unmerged; either must equal the base with its adapter wrapped in."""
    import torch

    from lmforge.model import bottleneck, lora
    from lmforge.train import checkpoint as ckpt

    loaded, _, meta = ckpt.load_for_inference(run_dir)
    base, _, _ = ckpt.load_model(meta["base"]["path"])
    if meta["adapter"].get("kind") == bottleneck.KIND:
        bottleneck.apply_adapters(base, bottleneck.AdapterConfig.from_dict(meta["adapter"]))
        load = bottleneck.load_adapter_tensors
    else:
        lora.apply_lora(base, lora.LoraConfig.from_dict(meta["adapter"]))
        load = lora.load_lora_tensors
    where = ckpt.resolve_checkpoint(run_dir) / "adapter.safetensors"
    load(base, ckpt.load_tensors(where), str(where))
    x = torch.randint(0, loaded.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((loaded(x)[0] - base.eval()(x)[0]).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an imported model folder (lmforge import)")
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--lr-lora", type=float, default=5e-4)
    ap.add_argument("--lr-adapter", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--adapter-size", type=int, default=0, help="0: the width matching LoRA's parameter count")
    ap.add_argument("--modes", default="lora,adapter,adapter64,full", help="comma-separated, run in this order")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"lora", "adapter", "adapter64", "full"})
    if unknown:
        sys.exit(f"unknown modes {unknown} (choose from lora, adapter, adapter64, full)")
    if not args.adapter_size:
        args.adapter_size = matched_adapter_size(args.model, args.rank)
    per_mode = {"lora": {"lora": True, "lora_rank": args.rank, "lr": args.lr_lora},
                "adapter": {"adapter": True, "adapter_size": args.adapter_size, "lr": args.lr_adapter},
                "adapter64": {"adapter": True, "adapter_size": 64, "lr": args.lr_adapter},
                "full": {"lr": args.lr_full}}  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = {"base": args.model, "data": args.data, "max_steps": args.steps, "batch_size": args.batch_size,
                  "seq_len": args.seq_len, "eval_every": 0, "eval_batches": args.eval_batches, "samples": 0,
                  "warmup_steps": max(1, args.steps // 10), "ckpt_every": 0, "log_every": 1}  # fmt: skip
        for mode in modes:
            rows[mode] = r = run_mode({**common, "out": str(Path(tmp) / mode), **per_mode[mode]})
            print(f"{mode}: trainable {r['trainable_params']:,}/{r['total_params']:,} "
                  f"({r['trainable_params'] / r['total_params']:.2%}), peak RSS {r['peak_rss_mb']:,.0f} MB, "
                  f"weights+grads+AdamW {r['state_mb']:,.0f} MB, {r['tokens_per_s']:,.0f} tok/s, "
                  f"{r['wall_s']:.0f}s, held-out loss {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}", flush=True)  # fmt: skip
        if "lora" in rows:
            rows["lora"]["merged_vs_unmerged_max_abs"] = loaded_equals_by_hand(str(Path(tmp) / "lora"))
            print(f"merged vs unmerged LoRA logits: max abs diff {rows['lora']['merged_vs_unmerged_max_abs']:.2e}")
        for mode in ("adapter", "adapter64"):
            if mode in rows:
                rows[mode]["loaded_vs_by_hand_max_abs"] = diff = loaded_equals_by_hand(str(Path(tmp) / mode))
                print(f"{mode}: loaded vs base + adapter by hand: max abs diff {diff:.2e}")
    print("\n| mode | lr | trainable params | share | held-out answer loss before -> after | tokens/s | peak RSS |"
          "\n|---|---:|---:|---:|---|---:|---:|")  # fmt: skip
    names = {"lora": f"LoRA r={args.rank} (q,k,v,o)", "adapter": f"adapters m={args.adapter_size}",
             "adapter64": "adapters m=64", "full": "full fine-tuning"}  # fmt: skip
    for mode, r in rows.items():
        share = r["trainable_params"] / r["total_params"]
        loss = f"{r['val_loss_before']:.3f} -> {r['val_loss_after']:.3f}"
        print(f"| {names[mode]} | {per_mode[mode]['lr']:g} | {r['trainable_params']:,} | {share:.2%} | {loss} "
              f"| {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} MB |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **rows}, indent=2))


if __name__ == "__main__":
    main()
