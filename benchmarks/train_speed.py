"""Training-step speed side by side: lmforge vs nanoGPT vs transformers' GPT-2 and Llama, one shape.

    python benchmarks/train_speed.py                 # L=4, d=256, 4 heads, T=256, V=8192, batch 16, fp32
    python benchmarks/train_speed.py --json          # one JSON line per model, then a summary line
    python benchmarks/train_speed.py --no-compile    # eager models only (skips the inductor builds)
    python benchmarks/train_speed.py --no-compile --only "as shipped,tiny (as,bf16"   # bf16 autocast rows
    python benchmarks/train_speed.py --only "as shipped,bf16"   # bf16 autocast, eager and compiled

Every model trains on the same random batch with the same AdamW (weight decay on matrices,
betas 0.9/0.95), timed by `lmforge.train.bench.time_train_steps` (forward + backward +
optimizer step). Models are interleaved round by round, so drift in machine load (other
processes on the same cores) hits all of them alike; the reported number is the median of the
per-round medians. torch.compile time is reported separately and excluded from tokens/s.
Rows built from lmforge's `Linear` run their fp32 products through this machine's default backend, as
`lmforge pretrain` does (lmforge/model/matmul.py: torch's MKL products on Intel, oneDNN elsewhere); the
"other backend" rows run the same code through the other one, for the comparison.
The results go into BENCHMARKS.md ("Training speed, CPU").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.matmul import Linear, default_backend, set_cpu_matmul
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.bench import time_train_steps
from lmforge.train.common import tune_cpu_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the `model(idx, targets) -> (logits, loss)` interface."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx, targets):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def nanogpt(a):
    from nanogpt_model import GPT, GPTConfig

    cfg = GPTConfig(
        block_size=a.seq_len, vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.d_model,
        dropout=0.0, bias=False,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        return GPT(cfg)


def hf_gpt2(a):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=a.vocab_size, n_positions=a.seq_len, n_embd=a.d_model, n_layer=a.n_layer, n_head=a.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return HFCausalLM(GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa"))


def hf_llama(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.d_model, intermediate_size=a.d_ff, num_hidden_layers=a.n_layer,
        num_attention_heads=a.n_head, num_key_value_heads=a.n_head, max_position_embeddings=a.seq_len,
        tie_word_embeddings=True, attention_dropout=0.0,
    )  # fmt: skip
    return HFCausalLM(LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa"))


def lmforge_tiny(a, **variant):
    cfg = ModelConfig(
        vocab_size=a.vocab_size, n_layer=a.n_layer, d_model=a.d_model, n_head=a.n_head, d_ff=a.d_ff,
        max_seq_len=a.seq_len, **variant,
    )  # fmt: skip
    return Transformer(cfg)


def lmforge_gpt2(a):
    cfg = ModelConfig(
        vocab_size=a.vocab_size, n_layer=a.n_layer, d_model=a.d_model, n_head=a.n_head, max_seq_len=a.seq_len,
        pos_encoding="learned", norm="layernorm", mlp="gelu",
    )  # fmt: skip
    return Transformer(cfg)


def nanogpt_onednn(a):
    """nanoGPT's model.py with its nn.Linear layers switched to lmforge's Linear (same parameters, tying kept)."""
    model = nanogpt(a)
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return model


# (row name, builder, torch.compile, AdamW(fused=True), lmforge's CPU matmul backend, bf16 autocast); the first row is the
# baseline of the ratio column, the second of the "vs nanoGPT fused" column. Without fused=True, AdamW on
# CPU runs torch's default implementation, which is what nanoGPT's configure_optimizers gets on CPU (it asks
# for fused on CUDA only). lmforge's `pretrain` uses fused AdamW on CPU (make_optimizer) and this machine's default
# backend for its fp32 matmuls (lmforge/model/matmul.py: MKL on Intel, oneDNN elsewhere), so its row is the training
# loop as shipped. The backend only changes rows built from lmforge's Linear (the lmforge rows and the "nanoGPT,
# oneDNN linears" row): the "other backend" rows show what the same code gives through the one pretrain does not
# use here. The last field: the forward under bf16 autocast (`--set dtype=bfloat16` in pretrain; on a CPU with
# AVX-512 BF16 oneDNN multiplies in bf16); nanoGPT's train.py never autocasts on CPU, so its bf16 row is its model.py
# under the same autocast.
SHIPPED = default_backend()
OTHER = "aten" if SHIPPED == "onednn" else "onednn"
ROWS = [
    ("nanoGPT (as shipped: default AdamW on CPU)", nanogpt, False, False, SHIPPED, False),
    ("nanoGPT, fused AdamW", nanogpt, False, True, SHIPPED, False),
    ("HF GPT2LMHeadModel, fused AdamW", hf_gpt2, False, True, SHIPPED, False),
    ("HF LlamaForCausalLM, fused AdamW", hf_llama, False, True, SHIPPED, False),
    (f"lmforge tiny (as pretrain runs it: {SHIPPED})", lmforge_tiny, False, True, SHIPPED, False),
    (f"lmforge tiny, other backend ({OTHER})", lmforge_tiny, False, True, OTHER, False),
    ("lmforge gpt2-like, fused AdamW", lmforge_gpt2, False, True, SHIPPED, False),
    ("nanoGPT, oneDNN linears, fused AdamW", nanogpt_onednn, False, True, "onednn", False),
    ("lmforge tiny, bf16 autocast", lmforge_tiny, False, True, SHIPPED, True),
    ("nanoGPT, bf16 autocast, fused AdamW", nanogpt, False, True, SHIPPED, True),
    ("nanoGPT, compiled, fused AdamW", nanogpt, True, True, SHIPPED, False),
    ("lmforge tiny, compiled", lmforge_tiny, True, True, SHIPPED, False),
    (f"lmforge tiny, compiled, other backend ({OTHER})", lmforge_tiny, True, True, OTHER, False),
    ("lmforge tiny, bf16 autocast, compiled", lmforge_tiny, True, True, SHIPPED, True),
    ("nanoGPT, bf16 autocast, compiled, fused AdamW", nanogpt, True, True, SHIPPED, True),
    # The speedrun's architecture variants (benchmarks/speedrun_cpu.py), to tell their step time from the machine's drift.
    ("lmforge + qk_norm, bf16 autocast, compiled", partial(lmforge_tiny, qk_norm=True), True, True, SHIPPED, True),
    ("lmforge untied, bf16 autocast, compiled", partial(lmforge_tiny, tie_embeddings=False), True, True, SHIPPED, True),
]


def _optimizer(model, fused):
    """AdamW with weight decay on matrices only (as both nanoGPT and lmforge do); fused or torch's default."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True if fused else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=704, help="Llama/lmforge SwiGLU width (GPT-2 style rows use 4*d)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all models")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before round 1")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--only", default=None, help="comma-separated substrings: keep rows whose name contains one")
    p.add_argument("--json", action="store_true")
    p.add_argument("--default-allocator", action="store_true", help="skip tune_cpu_allocator() (applies to every row)")
    a = p.parse_args(argv)
    if not a.default_allocator:
        tune_cpu_allocator()  # process-wide: every row, nanoGPT's included, runs with it

    rows = [r for r in ROWS if not (a.no_compile and r[2])]
    if a.only:
        rows = [r for r in rows if any(s.strip() in r[0] for s in a.only.split(","))]
    torch.manual_seed(0)
    idx = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len))
    targets = torch.roll(idx, -1, dims=1)
    entries = []
    for name, build, compile_, fused, backend, bf16 in rows:
        set_cpu_matmul(backend)
        torch.manual_seed(0)
        model = build(a)
        params = sum(p.numel() for p in model.parameters())  # parameters() skips the tied duplicate
        step_model = torch.compile(model) if compile_ else model
        opt = _optimizer(model, fused)
        t0 = time.perf_counter()
        time_train_steps(step_model, idx, targets, steps=0, warmup=1, optimizer=opt, bf16=bf16)  # compile here
        first_s = time.perf_counter() - t0
        time_train_steps(step_model, idx, targets, steps=0, warmup=a.warmup - 1, optimizer=opt, bf16=bf16)
        entries.append({"model": name, "params": params, "compile_s": first_s if compile_ else None,
                        "step": (step_model, opt), "backend": backend, "bf16": bf16, "rounds": []})  # fmt: skip
        print(f"built {name}: {params:,} params, first step {first_s:.1f}s", file=sys.stderr)
    for r in range(a.rounds):
        order = entries if r % 2 == 0 else entries[::-1]  # alternate direction: no model always runs first
        for e in order:
            step_model, opt = e["step"]
            set_cpu_matmul(e["backend"])
            e["rounds"].append(time_train_steps(step_model, idx, targets, steps=a.steps, warmup=0, optimizer=opt,
                                                bf16=e["bf16"]))  # fmt: skip
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    base = statistics.median(entries[0]["rounds"])
    base_fused = statistics.median(entries[1]["rounds"]) if len(entries) > 1 else base
    results = []
    for e in entries:
        tps = statistics.median(e["rounds"])
        results.append({"model": e["model"], "params": e["params"], "tokens_per_s": round(tps, 1),
                        "ratio_to_nanogpt": round(tps / base, 3),
                        "ratio_to_nanogpt_fused": round(tps / base_fused, 3), "compile_s": e["compile_s"] and round(e["compile_s"], 1),
                        "per_round": [round(x, 1) for x in e["rounds"]]})  # fmt: skip
    shape = {k: getattr(a, k) for k in ("n_layer", "d_model", "n_head", "d_ff", "seq_len", "vocab_size", "batch_size")}
    if a.json:
        for res in results:
            print(json.dumps(res))
        print(json.dumps({"shape": shape, "threads": torch.get_num_threads(), "torch": torch.__version__}))
        return 0
    print(f"shape {shape}, fp32 unless the row says bf16, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'model':<44} | {'params':>10} | {'tokens/s':>9} | vs nanoGPT | vs nanoGPT fused | compile s |")
    print(f"|{'-' * 46}|{'-' * 11}:|{'-' * 10}:|{'-' * 11}:|{'-' * 17}:|{'-' * 10}:|")
    for res in results:
        c = "" if res["compile_s"] is None else f"{res['compile_s']:.0f}"
        print(
            f"| {res['model']:<44} | {res['params']:>10,} | {res['tokens_per_s']:>9,.0f} |"
            f" {res['ratio_to_nanogpt']:>9.2f}x | {res['ratio_to_nanogpt_fused']:>15.2f}x | {c:>9} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
