"""lmforge's C kernels for the CPU decode step (lmforge/model/cpu_kernels.c) against the torch ops they replace.
The int8 product is in tests/test_quant.py. Run: pytest tests/test_cpu_kernels.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer, cpu_kernels
from lmforge.model.transformer import KVCache, apply_rope
from lmforge.serve.generate import FusedDecoder

pytestmark = pytest.mark.skipif(cpu_kernels.loaded() is None, reason=f"CPU kernels {cpu_kernels.status()}")


@pytest.mark.parametrize("rows,width", [(1, 576), (3, 256), (5, 17)])
def test_rms_norm_is_torchs(rows, width):
    torch.manual_seed(width)
    x, w = torch.randn(rows, width) * 4, torch.randn(width)
    assert torch.allclose(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (width,), w, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B,H,Hk,D,L", [(1, 9, 3, 64, 1), (1, 9, 3, 64, 70), (2, 4, 4, 24, 13), (3, 8, 2, 20, 5)])
def test_decode_attention_is_sdpa(B, H, Hk, D, L):
    """One query per head against the first L positions of a KV cache (a strided view), grouped heads included."""
    torch.manual_seed(L)
    cache_k, cache_v = torch.randn(B, Hk, L + 7, D), torch.randn(B, Hk, L + 7, D)
    k, v, q = cache_k[:, :, :L], cache_v[:, :, :L], torch.randn(B, H, D) * 2
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=Hk != H)[:, :, 0]
    assert torch.allclose(cpu_kernels.decode_attention(q, k, v), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,shared", [(1, True), (3, True), (3, False)])
def test_rope_is_apply_rope_bit_for_bit(B, shared):
    """On the q/k heads of a fused q/k/v row (a strided view), with one position for all rows or one per row."""
    torch.manual_seed(B)
    h = torch.randn(B, 9 + 2 * 3, 64)
    cos, sin = torch.randn(1 if shared else B, 1, 64), torch.randn(1 if shared else B, 1, 64)
    x = h[:, :12]
    assert torch.equal(cpu_kernels.rope(x, cos, sin), apply_rope(x, cos, sin))


def test_the_fused_step_uses_them_and_matches_the_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=2, d_model=96, n_head=6, n_kv_head=2, d_ff=192, max_seq_len=64)
    model = Transformer(cfg).eval()
    dec = FusedDecoder(model, 1)
    assert dec.c_attention and dec.norm.func is cpu_kernels.rms_norm
    with torch.inference_mode():
        cache, ref_cache = KVCache(cfg, 1, 32), KVCache(cfg, 1, 32)
        idx = torch.tensor([[5, 9, 2, 7, 1]])
        model(idx, cache=cache)
        model(idx, cache=ref_cache)
        for t in (3, 11, 4):
            tok = torch.tensor([t])
            fast = dec(tok, cache)
            ref = model(tok[:, None], cache=ref_cache)[0][:, -1]
            assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
