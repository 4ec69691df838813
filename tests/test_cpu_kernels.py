"""lmforge's C kernels for the CPU decode step (lmforge/model/cpu_kernels.c) against the torch ops they replace.
The int8 product is in tests/test_quant.py. Run: pytest tests/test_cpu_kernels.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer, cpu_kernels
from lmforge.model.transformer import KVCache, apply_rope
from lmforge.serve.generate import FusedDecoder

pytestmark = pytest.mark.skipif(cpu_kernels.loaded() is None, reason=f"CPU kernels {cpu_kernels.status()}")


@pytest.mark.parametrize("rows,width", [(1, 576), (3, 256), (5, 17), (300, 576)])  # 300 rows: split over threads
def test_rms_norm_is_torchs(rows, width):
    torch.manual_seed(width)
    x, w = torch.randn(rows, width) * 4, torch.randn(width)
    assert torch.allclose(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (width,), w, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "B,H,Hk,D,L", [(1, 9, 3, 64, 1), (1, 9, 3, 64, 70), (2, 4, 4, 24, 13), (3, 8, 2, 20, 5), (2, 40, 2, 16, 9)]
)
def test_decode_attention_is_sdpa(B, H, Hk, D, L):
    """One query per head against the first L positions of a KV cache (a strided view), grouped heads included."""
    torch.manual_seed(L)
    cache_k, cache_v = torch.randn(B, Hk, L + 7, D), torch.randn(B, Hk, L + 7, D)
    k, v, q = cache_k[:, :, :L], cache_v[:, :, :L], torch.randn(B, H, D) * 2
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=Hk != H)[:, :, 0]
    assert torch.allclose(cpu_kernels.decode_attention(q, k, v), ref, rtol=1e-5, atol=1e-6)


def test_decode_attention_with_row_lengths_is_masked_sdpa():
    """The serving engine's rows, each at its own length: the same as SDPA with the keys past each row's hidden."""
    torch.manual_seed(1)
    B, H, Hk, D, L = 4, 6, 2, 32, 20
    k, v, q = torch.randn(B, Hk, L + 3, D)[:, :, :L], torch.randn(B, Hk, L + 3, D)[:, :, :L], torch.randn(B, H, D)
    lengths = torch.tensor([20, 1, 7, 13])
    mask = torch.arange(L)[None, None, None, :] < lengths[:, None, None, None]  # (B, 1, 1, L)
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]
    assert torch.allclose(cpu_kernels.decode_attention(q, k, v, lengths), ref, rtol=1e-5, atol=1e-6)
    for bad in ([20, 0, 7, 13], [21, 1, 7, 13]):  # past the keys given, or none: refused before reading
        with pytest.raises(ValueError, match="row length"):
            cpu_kernels.decode_attention(q, k, v, torch.tensor(bad))


def test_decode_attention_reads_each_query_rows_slot():
    """The engine's packed step: query rows of several cache slots, each at its own length (a prompt's tokens share
    their slot at growing lengths), the same as SDPA on that slot's keys with the rest masked; a bad slot refused."""
    torch.manual_seed(3)
    S, H, Hk, D, L = 5, 6, 2, 32, 24
    k, v = torch.randn(S, Hk, L + 3, D)[:, :, :L], torch.randn(S, Hk, L + 3, D)[:, :, :L]
    slots, lengths = torch.tensor([3, 0, 3, 3, 4]), torch.tensor([9, 24, 10, 11, 1])
    q = torch.randn(len(slots), H, D)
    mask = torch.arange(L)[None, None, None, :] < lengths[:, None, None, None]
    ref = F.scaled_dot_product_attention(q[:, :, None], k[slots], v[slots], attn_mask=mask, enable_gqa=True)[:, :, 0]
    assert torch.allclose(cpu_kernels.decode_attention(q, k, v, lengths, slots), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="slot"):
        cpu_kernels.decode_attention(q, k, v, lengths, torch.tensor([3, 0, 5, 3, 4]))


def test_decode_attention_stores_the_new_keys_first():
    """`new`: each row's key and value (strided views of a fused q/k/v product, as the packed step passes them, q too) land at
    its slot and position lengths - 1 before any row attends, so a prompt token sees its chunk's earlier tokens: the
    same cache and output as writing them by index, then attending. A bad slot is refused before anything is written."""
    torch.manual_seed(4)
    S, H, Hk, D, L = 5, 6, 2, 32, 24
    k, v = torch.randn(S, Hk, L, D), torch.randn(S, Hk, L, D)
    slots, lengths = torch.tensor([3, 0, 3, 3, 4]), torch.tensor([9, 24, 10, 11, 1])
    fused = torch.randn(len(slots), H + 2 * Hk, D)  # rows of [q heads | k heads | v heads]
    q, kn, vn = fused[:, :H], fused[:, H : H + Hk], fused[:, H + Hk :]
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[slots, :, lengths - 1], v_ref[slots, :, lengths - 1] = kn, vn
    ref = cpu_kernels.decode_attention(q, k_ref, v_ref, lengths, slots)
    assert torch.equal(cpu_kernels.decode_attention(q, k, v, lengths, slots, new=(kn, vn)), ref)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    before = k.clone()
    with pytest.raises(ValueError, match="slot"):
        cpu_kernels.decode_attention(q, k, v, lengths, torch.tensor([3, 0, 5, 3, 4]), new=(kn * 2, vn))
    assert torch.equal(k, before)


@pytest.mark.parametrize(
    "H,Hk,D", [(9, 3, 64), (4, 4, 16), (4, 2, 32), (2, 1, 128), (3, 3, 20), (6, 2, 24), (2, 1, 80), (4, 2, 48)]
)
def test_span_attention_is_sdpa_with_the_mask_of_its_spans(H, Hk, D):
    """The scorer's flat batches: each query over two spans of a flat sequence's keys (k and v strided views of one
    q/k/v product, heads grouped), the same as SDPA (in float64) with a mask that shows those keys only; scores far apart (a
    softmax weight underflows) included; a span past the keys, spans that overlap, or a query with no key, refused
    before reading."""
    torch.manual_seed(D)
    T = 37
    qkv = torch.randn(T, H + 2 * Hk, D) * 3
    q, k, v = qkv[:, :H], qkv[:, H : H + Hk], qkv[:, H + Hk :]
    spans = []
    for t in range(T):
        a = int(torch.randint(0, t + 1, ()))
        spans.append([a, t + 1 - a, 0, 0] if t % 3 == 0 else [0, min(a, t - t // 2), t - t // 2, t // 2 + 1])
    spans[5] = [0, 0, 2, 4]  # the first span empty
    spans_t = torch.tensor(spans)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for t, (a, n, b, m) in enumerate(spans):
        mask[t, a : a + n] = True
        mask[t, b : b + m] = True
    q = q.clone()
    q[7] *= 40  # softmax weights below e^-87
    # in float64: float32 SDPA is itself off by up to ~8e-5 here (scores up to ~600), the kernel by ~5e-6
    qd, kd, vd = (t.double().transpose(0, 1)[None] for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    got = cpu_kernels.span_attention(q, k, v, spans_t)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=2e-5)
    for bad in ([0, T + 1, 0, 0], [0, 0, 0, 0], [-1, 2, 0, 0], [0, 1, T - 1, 2], [0, 5, 4, 2]):  # [0, 5, 4, 2]: overlap
        with pytest.raises(ValueError, match="span"):
            cpu_kernels.span_attention(q[:1], k, v, torch.tensor([bad]))


@pytest.mark.parametrize("V", [7, 16, 33, 8192, 49152])
def test_argmax_is_torchs_first_maximum_or_first_nan(V):
    """Greedy decoding and the scorer's is-greedy check: the same index as torch.argmax, ties and NaNs included."""
    torch.manual_seed(V)
    x = torch.randn(6, V + 3)
    j = torch.randint(0, V, (3,)).tolist()
    x[1, j[0]] = x[1].max() + 1
    x[1, j[1]] = x[1, j[0]]  # a tie: the first of the two
    x[2, j[2]] = float("nan")
    x[2, (j[2] + 1) % V] = float("nan")
    x[3] = x[3].round()  # many ties
    x[4] = float("-inf")
    x[5, -1] = 1e30
    for rows in (x, x[:, 3:]):  # contiguous, and strided rows
        assert torch.equal(cpu_kernels.argmax(rows), rows.argmax(-1))
        assert torch.equal(cpu_kernels.greedy(rows), rows.argmax(-1))
    assert torch.equal(cpu_kernels.greedy(x.double()), x.double().argmax(-1))  # other dtypes: torch's own


@pytest.mark.parametrize("V", [7, 33, 4096, 49152])
def test_target_logprob_is_log_softmax_gathered_and_the_argmax_check(V):
    """The scorer's per-token numbers: log_softmax(x)[target] (within float32 rounding of torch's) and whether the
    target is torch's argmax, on ties, a NaN row, -inf logits, strided rows, many rows (threads); a target outside the
    vocabulary refused."""
    torch.manual_seed(V)
    x = torch.randn(300, V + 5) * 6
    x[1, 3] = x[1].max() + 1
    x[1, 5] = x[1, 3]  # a tie: 3 is the argmax, 5 is not
    x[2, 4] = float("nan")
    x[3, : V // 2] = float("-inf")
    target = torch.randint(0, V, (300,))
    target[:4] = torch.tensor([0, 5, 4, V - 1])
    target[10:20] = x[10:20, :V].argmax(-1)
    for rows in (x[:, 5:].contiguous(), x[:, :V]):
        ll, hit = cpu_kernels.target_logprob(rows, target)
        ref = torch.log_softmax(rows.double(), -1).gather(1, target[:, None])[:, 0]
        assert torch.allclose(ll.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert torch.equal(hit, rows.argmax(-1) == target)
    assert hit[10:20].all() and not hit[1] and ll[2].isnan()  # x[:, :V]: the rows set up above
    with pytest.raises(ValueError, match="target"):
        cpu_kernels.target_logprob(x[:2, :V], torch.tensor([0, V]))


def test_decode_attention_threads_split_rows_and_heads_exactly():
    """Enough work to wake the OpenMP threads (B * H pairs split between them): the same numbers as one thread."""
    torch.manual_seed(2)
    B, H, Hk, D, L = 16, 9, 3, 64, 120
    k, v, q = torch.randn(B, Hk, L + 5, D)[:, :, :L], torch.randn(B, Hk, L + 5, D)[:, :, :L], torch.randn(B, H, D)
    lengths = torch.randint(1, L + 1, (B,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.decode_attention(q, k, v, lengths)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(cpu_kernels.decode_attention(q, k, v, lengths), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("M,width", [(1, 1536), (4, 704), (3, 20), (300, 704)])  # 300 rows: split over threads
def test_silu_mul_is_swiglu(M, width):
    """SwiGLU on a fused [gate | up] product (strided rows): F.silu(gate) * up within float32 rounding, saturated
    gates included."""
    torch.manual_seed(width)
    h = torch.randn(M, 2 * width + 6)[:, 3 : 2 * width + 3] * 4
    h[0, :4] = torch.tensor([-100.0, 100.0, -90.0, 0.0])
    gate, up = h.chunk(2, dim=-1)
    assert torch.allclose(cpu_kernels.silu_mul(h), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,shared", [(1, True), (3, True), (3, False), (200, False)])
def test_rope_is_apply_rope_bit_for_bit(B, shared):
    """On the q/k heads of a fused q/k/v row (a strided view), with one position for all rows or one per row (200
    rows: split over threads, the scorer's batches)."""
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
    assert dec.c_kernels and dec.rope is cpu_kernels.rope and dec.norm.func is cpu_kernels.rms_norm
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


def test_the_avx2_build_passes_the_same_tests(tmp_path):
    """Laptops and older servers have AVX2 without AVX-512: build the kernels as there (a compiler wrapper adding
    -mno-avx512f) and run this file's other tests and the int8 ones on that build."""
    import os
    import shutil
    import subprocess
    import sys

    gcc = shutil.which("gcc")
    if gcc is None or "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("needs gcc and an AVX2 CPU")
    wrapper = tmp_path / "cc-avx2"
    wrapper.write_text(f'#!/bin/sh\nexec {gcc} "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CC": str(wrapper), "LMFORGE_KERNEL_CACHE": str(tmp_path / "cache")}
    status = subprocess.run([sys.executable, "-c", "from lmforge.model import cpu_kernels; print(cpu_kernels.status())"],
                            env=env, capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert status.stdout.startswith("built: AVX2"), status.stdout + status.stderr
    tests = [
        "tests/test_cpu_kernels.py",
        "tests/test_quant.py",
        "-k",
        "not avx2 and (kernel or rope or attention or norm)",
    ]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                          capture_output=True, text=True, check=False, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
