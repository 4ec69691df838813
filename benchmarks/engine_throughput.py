"""The serving engine's own throughput, without HTTP: `--clients` requests kept in flight, tokens/s.

    python benchmarks/engine_throughput.py --model runs/demo/sft --requests 160 --max-tokens 8 --rounds 5

What `lmforge serve` can give at most on one core (the server runs the engine on cores - 1 threads; here 1), and an
A/B of the fused decode step's product layout: "pack all" packs every fp32 weight with oneDNN for the batch (the
layout before session 18), "rule" is `_Proj`'s rule (lmforge/serve/generate.py: under MKL, only weights of at least
`PACK_MIN` elements). Prompts: 30 fixed token ids each, distinct per request (so the prefix cache stores but does
not hit); greedy, no stop tokens, so every request decodes exactly --max-tokens. Interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.serve import generate as gen
from lmforge.serve.engine import Engine, Request, Sampling
from lmforge.train.checkpoint import load_for_inference


def tokens_per_s(model, requests: int, clients: int, max_tokens: int, pack_min: int, max_batch: int) -> float:
    gen.PACK_MIN = pack_min  # read when the engine builds its FusedDecoder
    engine = Engine(model, max_batch=max_batch, max_context=min(256, model.cfg.max_seq_len))
    V = model.cfg.vocab_size
    got: list[int] = []

    def on_event(tok, lp, finish):
        if tok is not None:
            got.append(tok)

    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    pending = [Request([(7 * i + j) % (V - 10) + 10 for j in range(30)], sampling, on_event) for i in range(requests)]
    t0 = time.perf_counter()
    while pending or engine.running or engine.waiting:
        while pending and len(engine.running) + len(engine.waiting) < clients:
            engine.submit(pending.pop(0))
        engine.step()
    return len(got) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=64, help="the engine's slots (lmforge serve's --max-batch)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_for_inference(a.model)[0].eval()
    variants = {"pack all": 0, "rule": gen.PACK_MIN}
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, pack_min in variants.items():
            res[k].append(tokens_per_s(model, a.requests, a.clients, a.max_tokens, pack_min, a.max_batch))
    for k, v in res.items():
        print(f"{k}: {statistics.median(v):.1f} tok/s (rounds {[round(x) for x in v]})")
    print(f"rule / pack all: {statistics.median(res['rule']) / statistics.median(res['pack all']):.2f}x")


if __name__ == "__main__":
    main()
