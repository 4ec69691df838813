"""lmforge's C kernels for the CPU decode step (cpu_kernels.c beside this file): built once per machine, called by
QuantLinear (the int8 product) and FusedDecoder (RMSNorm, one-query attention).

    python -c "from lmforge.model import cpu_kernels; print(cpu_kernels.status())"    # built? which vector path?

The C file is compiled the first time it is needed (`cc -O3 -march=native -fopenmp`, under a second) into
~/.cache/lmforge/kernels (or $LMFORGE_KERNEL_CACHE), keyed by the source, the compiler and the CPU, and loaded with
ctypes; no torch headers, so no minute-long extension build. It links the OpenMP runtime torch has already loaded
(pip wheels ship libgomp.so.1, and the loader reuses a loaded soname), so its threads are torch's. Where it cannot be
built (no compiler, no AVX2, not Linux on x86-64) or with LMFORGE_NO_C_KERNELS=1, callers keep torch's own ops (ATen's
`_weight_int8pack_mm`, F.rms_norm, SDPA), with one stderr line where a C compiler would help. Why kernels of our own:
cpu_kernels.c's header and BENCHMARKS.md ("Compression and portability"): about 2x ATen's int8 product at batch 1.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]  # after the source, where the linker looks for what it needs
_state: dict = {}  # "lib": the loaded library or None, "why": the reason it is None


def _cache_dir() -> Path:
    """$LMFORGE_KERNEL_CACHE, else ~/.cache/lmforge/kernels, else (a read-only home) a per-user temporary folder."""
    if os.environ.get("LMFORGE_KERNEL_CACHE"):
        return Path(os.environ["LMFORGE_KERNEL_CACHE"])
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"lmforge-kernels-{os.getuid()}"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags (a copied cache must not run on another CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LMFORGE_NO_C_KERNELS"):
        return None, "LMFORGE_NO_C_KERNELS is set"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"built only on Linux x86-64 (this is {sys.platform} {platform.machine()})"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) found"
    version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, " ".join(FLAGS + LIBS), _cpu_id()]).encode()
    ).hexdigest()
    target = _cache_dir() / f"cpu_kernels-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # built beside it, then renamed: never half a file
        os.close(fd)
        cmd = [cc, *FLAGS, str(SOURCE), "-o", tmp, *LIBS]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        if done.returncode:
            os.unlink(tmp)
            first = (done.stderr.strip().splitlines() or ["?"])[0]
            return None, f"{Path(cc).name} failed on {SOURCE.name}: {first}"
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    if lib.lmf_isa() == 0:
        return None, "the CPU has neither AVX-512 nor AVX2+FMA"
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    signatures = {
        "lmf_int8_gemm": [ptr, i64, i64, ptr, ptr, i64, ptr, i32],
        "lmf_rms_norm": [ptr, i64, i64, ptr, f32, ptr, i32],
        "lmf_decode_attention": [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64,
                                 i64, f32, ptr, i32],
        "lmf_span_attention": [ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, ptr, f32, ptr, i32],
        "lmf_rope": [ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, i32],
        "lmf_argmax": [ptr, i64, i64, i64, ptr],
        "lmf_silu_mul": [ptr, i64, i64, i64, ptr, i32],
        "lmf_target_logprob": [ptr, i64, i64, i64, ptr, ptr, ptr, i32],
    }  # fmt: skip
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib, f"AVX-{lib.lmf_isa()} ({target})".replace("AVX-256", "AVX2")


def loaded() -> ctypes.CDLL | None:
    """The library, or None where it is not available (the reason: `status()`); built on the first call."""
    if "lib" not in _state:
        try:
            lib, why = _build()
        except (OSError, subprocess.SubprocessError) as e:  # an unwritable cache, a .so the loader refuses, a hung cc
            lib, why = None, f"{type(e).__name__}: {e}"
        _state.update(lib=lib, why=why)
        # said once where the user can do something about it (install a C compiler); not where no build applies
        fixable = not why.startswith(("LMFORGE_NO_C_KERNELS", "built only on", "the CPU has neither"))
        if lib is None and fixable:
            print(f"lmforge: CPU kernels not built ({why}); using torch's ops (int8 decoding about 2x slower)",
                  file=sys.stderr)  # fmt: skip
    return _state["lib"]


def isa() -> int:
    """The built library's vector width in bits: 512 (AVX-512) or 256 (AVX2 + FMA); 0 where it is not built."""
    lib = loaded()
    return lib.lmf_isa() if lib is not None else 0


def status() -> str:
    loaded()
    return ("built: " if _state["lib"] else "not built: ") + _state["why"]


def _lib():
    lib = loaded()
    if lib is None:
        raise RuntimeError(f"lmforge's CPU kernels are {status()}")
    return lib


def _check(code: int, what: str) -> None:
    if code == 3:
        raise ValueError(f"{what}: a row length or span outside the keys given, spans that overlap, or no key")
    if code == 4:
        raise ValueError(f"{what}: a slot outside the cache's rows")
    if code == 5:
        raise ValueError(f"{what}: a target outside the vocabulary")
    if code:  # 1: malloc failed; 2: built without a vector path (loaded() refuses those)
        raise MemoryError(f"{what} failed with code {code} (1: out of memory for its scratch buffer)")


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, qweight (N, K) int8 contiguous, scales (N,) float32 (bf16 values) -> (M, N) bf16:
    bf16(scales[n] * sum_k bf16(x[m, k]) * qweight[n, k])."""
    fn = _lib().lmf_int8_gemm
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    _check(fn(x.data_ptr(), M, K, qweight.data_ptr(), scales.data_ptr(), N, y.data_ptr(), torch.get_num_threads()),
           "int8_gemm")  # fmt: skip
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dim of a float32 (M, K) x with a float32 weight, in one call."""
    x = x.contiguous()
    y = torch.empty_like(x)
    code = _lib().lmf_rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, y.data_ptr(),
                               torch.get_num_threads())  # fmt: skip
    _check(code, "rms_norm")
    return y


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    new: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (B, H, D) float32 (rows may be strided, heads contiguous) against k, v (B, Hk, L, D) float32 (views of a KV
    cache: their last dim contiguous, the same strides) -> (B, H, D): softmax(q k^T / sqrt(D)) v per head, head h
    reading kv head h // (H // Hk); what
    F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True) gives with no mask. `lengths` (B,) int64:
    row b sees its first lengths[b] keys only (as a mask hiding the rest would). `slots` (B,) int64: query row b reads
    cache row slots[b] of k, v (S, Hk, L, D) instead of row b (the serving engine's packed step). `new` (with
    lengths): each row's own key and value (B, Hk, D), heads contiguous, written into k and v at its slot and position
    lengths[b] - 1 before any row attends."""
    B, H, D = q.shape
    S, Hk, L = k.shape[0], k.shape[1], k.shape[2]
    if q.stride()[1:] != (D, 1):  # rows may be strided (a view of the fused q/k/v product), heads contiguous
        q = q.contiguous()
    out = torch.empty(B, H, D, dtype=q.dtype)
    kb, kh, kt, kd = k.stride()
    assert kd == 1 and kt == D and v.stride() == k.stride(), "k and v must be KV-cache views"
    if lengths is not None:  # each in 1..L: checked by the kernel (code 3), without a sync per layer here
        lengths = lengths.to(torch.int64).contiguous()
        assert lengths.shape == (B,)
    if slots is not None:  # each in 0..S-1: checked by the kernel (code 4)
        slots = slots.to(torch.int64).contiguous()
        assert slots.shape == (B,)
    else:
        assert S == B, "one cache row per query row, or slots"
    kn = vn = None
    kns = vns = 0
    if new is not None:
        assert lengths is not None and new[0].shape == new[1].shape == (B, Hk, D), "a key and value per row, lengths"
        kn, vn = (t if t.stride()[1:] == (D, 1) else t.contiguous() for t in new)  # rows may be strided (q/k/v views)
        assert kn.dtype == vn.dtype == k.dtype
        kns, vns, kn, vn = kn.stride(0), vn.stride(0), kn.data_ptr(), vn.data_ptr()
    code = _lib().lmf_decode_attention(q.data_ptr(), q.stride(0), B, H, Hk, D, k.data_ptr(), v.data_ptr(), kb, kh, L,
                                       None if lengths is None else lengths.data_ptr(),
                                       None if slots is None else slots.data_ptr(), S, kn, vn, kns, vns, D**-0.5,
                                       out.data_ptr(), torch.get_num_threads())  # fmt: skip
    _check(code, "decode_attention")
    return out


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """q (N, H, D), k and v (T, Hk, D) float32 (rows may be strided, each row's heads contiguous) -> (N, H, D): query n
    attends, per head (head h reading kv head h // (H // Hk)), to the keys of tokens spans[n, 0] .. spans[n, 0] +
    spans[n, 1] - 1 and spans[n, 2] .. spans[n, 2] + spans[n, 3] - 1 (int64 (N, 4); either length may be 0, not
    both; the two may not overlap): softmax(q k^T / sqrt(D)) v over those keys, what SDPA gives with a mask showing
    only them. The scorer's packed questions (lmforge/eval/scoring.py): a choice's tokens see their context and their
    own earlier tokens."""
    N, H, D = q.shape
    T, Hk = k.shape[0], k.shape[1]
    assert k.stride()[1:] == (D, 1) and v.stride()[1:] == (D, 1) and v.shape == k.shape, "heads contiguous in a row"
    q, spans = q.contiguous(), spans.to(torch.int64).contiguous()
    assert spans.shape == (N, 4)
    out = torch.empty_like(q)
    code = _lib().lmf_span_attention(q.data_ptr(), N, H, Hk, D, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                     T, spans.data_ptr(), D**-0.5, out.data_ptr(), torch.get_num_threads())  # fmt: skip
    _check(code, "span_attention")
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope (lmforge/model/transformer.py) on x (B, R, D) float32 (rows may be strided, heads contiguous within a
    row) with cos / signed sin (D,), (1, D) or (B, D) -> (B, R, D) contiguous; the same numbers bit for bit."""
    B, R, D = x.shape
    assert x.stride(2) == 1 and x.stride(1) == D, "x's heads must be contiguous within a row"
    cos, sin = cos.reshape(-1, D).contiguous(), sin.reshape(-1, D).contiguous()
    out = torch.empty(B, R, D)
    step = D if cos.shape[0] > 1 else 0
    _lib().lmf_rope(x.data_ptr(), B, R, D, x.stride(0), cos.data_ptr(), sin.data_ptr(), step, out.data_ptr(),
                    torch.get_num_threads())  # fmt: skip
    return out


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's F.silu(gate) * up for a float32 (M, 2F) h = [gate | up] (rows may be strided, each contiguous), the
    fused gate/up product -> (M, F), in one pass."""
    assert h.dim() == 2 and h.dtype == torch.float32 and h.stride(1) == 1 and h.shape[1] % 2 == 0
    M, F = h.shape[0], h.shape[1] // 2
    out = torch.empty(M, F)
    _check(_lib().lmf_silu_mul(h.data_ptr(), M, F, h.stride(0), out.data_ptr(), torch.get_num_threads()), "silu_mul")
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of a float32 (M, N) x (rows may be strided, each contiguous): the first maximum of each
    row, or its first NaN; int64 (M,)."""
    assert x.dim() == 2 and x.dtype == torch.float32 and x.stride(1) == 1
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _check(_lib().lmf_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr()), "argmax")
    return out


def target_logprob(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For float32 (M, N) logits (rows may be strided, each contiguous) and int64 (M,) targets: (log_softmax(logits)
    [m, target[m]] float32 (M,), whether target[m] is logits[m].argmax() (M,) bool), without writing the (M, N)
    log-probabilities (the scorer's per-token numbers)."""
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1
    M, N = logits.shape
    target = target.to(torch.int64).contiguous()
    assert target.shape == (M,)
    ll, hit = torch.empty(M), torch.empty(M, dtype=torch.bool)
    code = _lib().lmf_target_logprob(logits.data_ptr(), M, N, logits.stride(0), target.data_ptr(), ll.data_ptr(),
                                     hit.data_ptr(), torch.get_num_threads())  # fmt: skip
    _check(code, "target_logprob")
    return ll, hit


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), through lmf_argmax where it applies (a 2-D float32 CPU tensor, the kernels built)."""
    if logits.dim() == 2 and logits.device.type == "cpu" and logits.dtype == torch.float32 and loaded() is not None:
        return argmax(logits if logits.stride(1) == 1 else logits.contiguous())
    return logits.argmax(dim=-1)
