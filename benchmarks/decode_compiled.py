"""Does torch.compile speed up a batch-1 decode step on CPU? The eager fused step against the same step compiled.

    python benchmarks/decode_compiled.py --model /tmp/smol                 # SmolLM2 (a Llama: RoPE, RMSNorm, SwiGLU)
    python benchmarks/decode_compiled.py --model /tmp/smol --whole --rounds 4

The eager side is generation's own `FusedDecoder` step. The compiled side is the same arithmetic written for
inductor: a static KV cache (every position's slot allocated, a mask hides the unwritten ones, the position a
tensor) so that one graph serves every step, and one layer as the compiled function (inductor fuses the norm,
RoPE, cache write and SiLU into C++ kernels around the four products and attention), called once per layer;
`--whole` compiles the whole step (all layers) as one graph instead. The script checks that both give the
same logits (within 1e-4), then times `--rounds` interleaved rounds of `--steps` steps each and prints each
round's median ms per step. Models other than RoPE + RMSNorm + SwiGLU with plain linears are refused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.model.transformer import KVCache, apply_rope
from lmforge.serve.generate import FusedDecoder
from lmforge.train.checkpoint import load_for_inference


def make_step(model, dec: FusedDecoder, T: int, whole: bool):
    """step(tok (1,), pos (1,) long, k, v) -> logits (1, V): the static-cache decode step, compiled one layer at a
    time, or as one graph when `whole`."""
    cfg = model.cfg
    H, Hk, D, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
    layers = [(blk.input_layernorm.weight, qkv.wt, o.wt, blk.post_attention_layernorm.weight, up.wt, down.wt)
              for blk, _, _, qkv, o, up, down, _ in dec.layers]  # fmt: skip

    def layer(x, cos, sin, valid, pos, k, v, n1, wqkv, wo, n2, wup, wdown):
        h = (F.rms_norm(x, (x.shape[-1],), n1, eps) @ wqkv).view(1, H + 2 * Hk, D)
        qk = apply_rope(h[:, : H + Hk], cos, sin)
        k.index_copy_(2, pos, qk[:, H:, None])
        v.index_copy_(2, pos, h[:, H + Hk :, None])
        y = F.scaled_dot_product_attention(qk[:, :H, None], k, v, attn_mask=valid, enable_gqa=Hk != H)
        x = torch.addmm(x, y.view(1, H * D), wo)
        gate, up = (F.rms_norm(x, (x.shape[-1],), n2, eps) @ wup).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate) * up, wdown)

    layer_fn = layer if whole else torch.compile(layer, fullgraph=True, dynamic=False)

    def step(tok, pos, k, v):
        x = model.embed_tokens.weight.index_select(0, tok)
        cos, sin = model.rope_cos.index_select(0, pos)[None], model.rope_sin.index_select(0, pos)[None]
        valid = (torch.arange(T) <= pos)[None, None, None, :]
        for i, weights in enumerate(layers):
            x = layer_fn(x, cos, sin, valid, pos, k[i], v[i], *weights)
        return dec.head(dec.norm(x))

    return torch.compile(step, fullgraph=True, dynamic=False) if whole else step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--whole", action="store_true", help="compile the whole step as one graph, not one layer")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_for_inference(a.model)[0].eval()
    c = model.cfg
    plain = c.pos_encoding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and not (c.qk_norm or c.bias)
    if not (plain and FusedDecoder.supports(model)):
        raise SystemExit("decode_compiled.py: only RoPE + RMSNorm + SwiGLU models with plain linears")
    P, T = a.prompt_tokens, a.prompt_tokens + a.steps + 1
    with torch.inference_mode():
        dec = FusedDecoder(model, 1)
        cache = KVCache(c, 1, T)
        model(
            torch.randint(0, c.vocab_size, (1, P), generator=torch.Generator().manual_seed(0)),
            cache=cache,
            last_only=True,
        )
        k, v = cache.k.clone(), cache.v.clone()
        tok = torch.tensor([7])
        compiled = make_step(model, dec, T, a.whole)
        t0 = time.perf_counter()
        got = compiled(tok, torch.tensor([P]), k, v)
        print(f"compile: {time.perf_counter() - t0:.1f} s")
        want = dec(tok, cache)
        cache.length = P
        diff = (got - want).abs().max().item()
        print(f"max |logit difference| against the eager fused step: {diff:.2e}")
        if diff > 1e-4:
            raise SystemExit("the compiled step does not compute the fused step's logits")
        times = {"eager fused": [], "compiled": []}
        for _ in range(a.rounds):
            for name, rounds in times.items():
                ts = []
                for i in range(a.steps):
                    s = time.perf_counter()
                    if name == "eager fused":
                        dec(tok, cache)
                    else:
                        compiled(tok, torch.tensor([P + i]), k, v)
                    ts.append(time.perf_counter() - s)
                cache.length = P
                rounds.append(statistics.median(ts) * 1e3)
        for name, ms in times.items():
            print(f"{name}: median {statistics.median(ms):.2f} ms a step; rounds {[round(m, 1) for m in ms]}")
        ratios = [e / c_ for e, c_ in zip(times["eager fused"], times["compiled"])]
        print(f"eager / compiled per round: {[round(r, 3) for r in ratios]}; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
