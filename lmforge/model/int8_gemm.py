"""lmforge's own int8 weight-only CPU kernel (int8_gemm.c beside this file): built once per machine, called by QuantLinear.

    python -c "from lmforge.model import int8_gemm; print(int8_gemm.status())"    # built? which vector path?

The C file is compiled the first time an int8 model runs on CPU (`cc -O3 -march=native -fopenmp`, about half a
second) into ~/.cache/lmforge/kernels (or $LMFORGE_KERNEL_CACHE), keyed by the source, the compiler and the CPU, and
loaded with ctypes; no torch headers, so no minute-long extension build. It links the OpenMP runtime torch has
already loaded (pip wheels ship libgomp.so.1, and the loader reuses a loaded soname), so its threads are torch's.
Where it cannot be built (no compiler, no AVX2, not Linux on x86-64) or with LMFORGE_NO_C_KERNELS=1, QuantLinear keeps
ATen's `_weight_int8pack_mm`, after one warning line. Why a kernel of our own: int8_gemm.c's header and
benchmarks/int8_kernels.py (about 2x ATen's at batch 1 on a 2-core Xeon).
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
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_state: dict = {}  # "fn": the ctypes function or None, "why": the reason it is None


def _cache_dir() -> Path:
    if os.environ.get("LMFORGE_KERNEL_CACHE"):
        return Path(os.environ["LMFORGE_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "kernels"


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
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_id()]).encode()).hexdigest()
    target = _cache_dir() / f"int8_gemm-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # built beside it, then renamed: never half a file
        os.close(fd)
        done = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp], check=False, capture_output=True, text=True, timeout=300
        )
        if done.returncode:
            os.unlink(tmp)
            first = (done.stderr.strip().splitlines() or ["?"])[0]
            return None, f"{Path(cc).name} failed on {SOURCE.name}: {first}"
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    if lib.lmf_int8_gemm_isa() == 0:
        return None, "the CPU has neither AVX-512 nor AVX2+FMA"
    fn = lib.lmf_int8_gemm
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    return fn, f"AVX-{lib.lmf_int8_gemm_isa()} ({target})".replace("AVX-256", "AVX2")


def kernel():
    """The ctypes function, or None where it is not available (the reason: `status()`); built on first call."""
    if "fn" not in _state:
        try:
            fn, why = _build()
        except (OSError, subprocess.SubprocessError) as e:  # an unwritable cache, a .so the loader refuses, a hung cc
            fn, why = None, f"{type(e).__name__}: {e}"
        _state.update(fn=fn, why=why)
        if fn is None and not os.environ.get("LMFORGE_NO_C_KERNELS"):
            print(
                f"lmforge: int8 CPU kernel not built ({why}); using ATen's, about 2x slower at batch 1", file=sys.stderr
            )
    return _state["fn"]


def status() -> str:
    kernel()
    return ("built: " if _state["fn"] else "not built: ") + _state["why"]


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, qweight (N, K) int8 contiguous, scales (N,) float32 (bf16 values) -> (M, N) bf16:
    bf16(scales[n] * sum_k bf16(x[m, k]) * qweight[n, k]). Where kernel() is None, RuntimeError."""
    fn = kernel()
    if fn is None:
        raise RuntimeError(f"lmforge's int8 kernel is {status()}")
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    code = fn(x.data_ptr(), M, K, qweight.data_ptr(), scales.data_ptr(), N, y.data_ptr(), torch.get_num_threads())
    if code:  # 1: no memory for the bf16-rounded activations; 2: built without a vector path (kernel() refuses those)
        raise MemoryError(f"int8_gemm failed with code {code} (1: out of memory for {M}x{K} activations)")
    return y
