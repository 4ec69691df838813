"""Generation speed on CPU: lmforge's engine vs transformers' LlamaForCausalLM.generate, same shape, one run.

    python benchmarks/generate_speed.py                       # tiny preset, 128-token prompt, 256 new tokens
    python benchmarks/generate_speed.py --batch 1 8 --repeats 3 --json out.json

Greedy decoding, random weights, a KV cache on both sides; transformers is forced to emit every
token (min_new_tokens). tok/s = batch * new tokens / wall time of the whole call (prefill included),
best of `--repeats` rounds. Each round times every engine once, in turn (lmforge with its fused decode
step, lmforge `fused=False` = the model's own forward each step, transformers), so a busy machine
hurts all alike; on a shared machine pass `--threads 1` (with more threads than free cores, OpenMP
waits dominate everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from lmforge.model import Transformer, preset
from lmforge.serve.generate import generate


def hf_llama(cfg):
    """transformers' Llama with our model's shape and weights (names match one to one, plus `model.`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(hf_cfg).eval()


def ours(model, ids, n, fused=True):
    prompts = ids.tolist()
    return lambda: generate(model, prompts, n, temperature=0, fused=fused)


def theirs(hf, ids, n):
    def run():
        with torch.inference_mode():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, use_cache=True, pad_token_id=0,
            )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n

    return run


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function over `repeats` rounds; each round runs every function once, in turn."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, lazy imports
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, 512, args.prompt_len + args.new_tokens))
    model = Transformer(cfg).eval()
    hf = None if args.no_hf else hf_llama(cfg)
    n = args.new_tokens
    rows = []
    for B in args.batch:
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt_len))
        fns = {"lmforge": ours(model, ids, n), "lmforge_unfused": ours(model, ids, n, fused=False)}
        if hf is not None:
            fns["transformers"] = theirs(hf, ids, n)
        row = {"batch": B} | {f"{k}_tok_s": B * n / t for k, t in best_times(fns, args.repeats).items()}
        if hf is not None:
            row["speedup"] = row["lmforge_tok_s"] / row["transformers_tok_s"]
            row["speedup_unfused"] = row["lmforge_unfused_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
    print(f"preset={args.preset} prompt={args.prompt_len} new={n} threads={torch.get_num_threads()} greedy, CPU")
    print(
        f"{'batch':>5} {'lmforge tok/s':>14} {'unfused tok/s':>14} {'transformers tok/s':>19} {'speedup':>8} {'unfused':>8}"
    )
    for r in rows:
        hf_s = f"{r['transformers_tok_s']:19.0f} {r['speedup']:7.2f}x {r['speedup_unfused']:7.2f}x" if hf else ""
        print(f"{r['batch']:>5} {r['lmforge_tok_s']:14.0f} {r['lmforge_unfused_tok_s']:14.0f} {hf_s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
