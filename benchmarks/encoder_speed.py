"""Masked-LM training speed: lmforge's encoder vs transformers' BertForMaskedLM at the bert-mini shape, on CPU.

    python benchmarks/encoder_speed.py                 # L=4, H=256, 4 heads, I=1024, V=30522, T=128, batch 32
    python benchmarks/encoder_speed.py --json          # one JSON line per model, then a summary line

The same batch (15% of positions masked) and the same AdamW for every model, dropout 0.1 as BERT trains, fp32,
timed by `lmforge.train.bench.time_train_steps` (forward + backward + optimizer step), models interleaved round
by round (the median of per-round medians), so load drift hits all alike. Rows:
- lmforge: `Encoder` as `pretrain --objective mlm` runs it: the vocabulary head only at the masked positions;
- lmforge, head on all positions: the same model computing every position's logits, as BertForMaskedLM does
  (what the kernels alone are worth);
- lmforge (aten): the first row with torch's default fp32 products instead of oneDNN (lmforge/model/matmul.py);
- transformers BertForMaskedLM (its default attention, SDPA).
The results go into BENCHMARKS.md ("Encoders").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import preset
from lmforge.model.encoder import Encoder
from lmforge.model.matmul import set_cpu_matmul
from lmforge.train.bench import time_train_steps
from lmforge.train.common import tune_cpu_allocator


class AllPositions(nn.Module):
    """lmforge's encoder computing the logits of every position, then the loss at the masked ones."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        logits, _ = self.model(idx)
        return None, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class HFMaskedLM(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx, targets):
        return None, self.hf(input_ids=idx, labels=targets).loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    tune_cpu_allocator()
    torch.manual_seed(0)
    cfg = preset("bert-mini")
    from transformers import BertConfig, BertForMaskedLM

    hc = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                    num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len)  # fmt: skip
    idx = torch.randint(5, cfg.vocab_size, (a.batch_size, a.seq_len))
    targets = torch.full_like(idx, -100)
    picked = torch.rand(idx.shape) < 0.15
    targets[picked] = idx[picked]
    models = {
        "lmforge": ("onednn", Encoder(cfg)),
        "lmforge, head on all positions": ("onednn", AllPositions(Encoder(cfg))),
        "lmforge (aten)": ("aten", Encoder(cfg)),
        "transformers BertForMaskedLM": ("aten", HFMaskedLM(BertForMaskedLM(hc))),
    }
    entries = []
    for name, (backend, model) in models.items():
        set_cpu_matmul(backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
        t0 = time.perf_counter()
        time_train_steps(model, idx, targets, steps=0, warmup=2, optimizer=opt)
        params = sum(p.numel() for p in model.parameters())
        entries.append({"model": name, "backend": backend, "m": model, "opt": opt, "params": params, "rounds": []})
        print(f"built {name}: {params:,} params, warm-up {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for r in range(a.rounds):
        for e in entries if r % 2 == 0 else entries[::-1]:
            set_cpu_matmul(e["backend"])
            e["rounds"].append(time_train_steps(e["m"], idx, targets, steps=a.steps, warmup=0, optimizer=e["opt"]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    ref = statistics.median(entries[-1]["rounds"])
    results = [{"model": e["model"], "params": e["params"], "tokens_per_s": round(statistics.median(e["rounds"]), 1),
                "ratio_to_transformers": round(statistics.median(e["rounds"]) / ref, 3),
                "per_round": [round(x, 1) for x in e["rounds"]]} for e in entries]  # fmt: skip
    shape = {"preset": "bert-mini", **{k: v for k, v in dataclasses.asdict(cfg).items()
             if k in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size")},
             "seq_len": a.seq_len, "batch_size": a.batch_size, "dropout": cfg.dropout, "threads": torch.get_num_threads()}  # fmt: skip
    if a.json:
        for res in results:
            print(json.dumps(res))
        print(json.dumps({"summary": shape, "torch": torch.__version__}))
    else:
        print(f"shape: {shape}")
        for res in results:
            print(f"{res['model']:34s} {res['params'] / 1e6:6.2f}M  {res['tokens_per_s']:9,.0f} tok/s  "
                  f"{res['ratio_to_transformers']:.2f}x transformers")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
