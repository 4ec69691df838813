"""The serving engine's own throughput, without HTTP: `--clients` requests kept in flight, tokens/s.

    python benchmarks/engine_throughput.py --model runs/demo/sft --requests 160 --max-tokens 8 --rounds 5
    python benchmarks/engine_throughput.py --model /tmp/smol --requests 32 --max-tokens 56 --threads 2 --rounds 3

What `lmforge serve` can give at most on `--threads` threads, and A/Bs of the engine step: "packed" is the default
step (decode rows and prompt chunks in one pass, lmforge/serve/engine.py `_packed_step`), "two-pass" the step before
session 20 (a prefill forward through the model, then the fused decode step), "pack all" the two-pass step with every
fp32 weight packed by oneDNN (the layout before session 18; "rule" packs only weights of `PACK_MIN` elements or more
under MKL, lmforge/serve/generate.py `_Proj`). Prompts: 30 fixed token ids each, distinct per request (so the prefix
cache stores but does not hit); greedy, no stop tokens, so every request decodes exactly --max-tokens. Interleaved
rounds, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.serve import generate as gen
from lmforge.serve.engine import Engine, Request, Sampling
from lmforge.train.checkpoint import load_for_inference


def tokens_per_s(model, requests: int, clients: int, max_tokens: int, pack_min: int, packed: bool,
                 max_batch: int) -> float:  # fmt: skip
    gen.PACK_MIN = pack_min  # read when the engine builds its FusedDecoder
    engine = Engine(model, max_batch=max_batch, max_context=min(1024, model.cfg.max_seq_len), packed=packed)
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
    ap.add_argument("--variants", default="two-pass,packed", help="of: pack all, two-pass, packed (the first: 1x)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_for_inference(a.model)[0].eval()
    variants = {"pack all": (0, False), "two-pass": (gen.PACK_MIN, False), "packed": (gen.PACK_MIN, True)}
    chosen = {k: variants[k] for k in a.variants.split(",")}
    res: dict[str, list[float]] = {k: [] for k in chosen}
    for _ in range(a.rounds):
        for k, (pack_min, packed) in chosen.items():
            res[k].append(tokens_per_s(model, a.requests, a.clients, a.max_tokens, pack_min, packed, a.max_batch))
    base = statistics.median(next(iter(res.values())))
    for k, v in res.items():
        med = statistics.median(v)
        print(f"{k}: {med:.1f} tok/s (rounds {[round(x) for x in v]}), {med / base:.2f}x")


if __name__ == "__main__":
    main()
