"""The oneDNN matrix products (lmforge/model/matmul.py) against float64 references and torch's own ops."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import ModelConfig, Transformer
from lmforge.model import matmul as mm

needs_onednn = pytest.mark.skipif(mm._LINEAR is None, reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture(params=["onednn", "aten"])
def backend(request):
    previous = mm.set_cpu_matmul(request.param)
    yield request.param
    mm.set_cpu_matmul(previous)


def _close(got, want64, rtol=1e-5):
    """Within fp32 rounding of the float64 product: max error relative to the largest entry."""
    err = (got.double() - want64).abs().max() / want64.abs().max()
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("m,k,n", [(64, 32, 96), (64, 96, 32), (5, 7, 3)])  # both mm_tn layouts, odd sizes
def test_products_match_float64(backend, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    dy = torch.randn(m, n, generator=g)
    _close(mm.mm_nt(a, b), a.double() @ b.double().t())
    _close(mm.mm_nn(dy, b), dy.double() @ b.double())
    _close(mm.mm_tn(dy, a), dy.double().t() @ a.double())
    assert mm.mm_tn(dy, a).shape == (n, k)


@needs_onednn
def test_onednn_applies_only_on_cpu_fp32(backend):
    x = torch.randn(4, 8)
    assert mm.onednn_applies(x) == (backend == "onednn")
    assert not mm.onednn_applies(x.bfloat16())
    assert not mm.onednn_applies(torch.empty(0, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mm.onednn_applies(x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_matches_f_linear_forward_and_backward(backend, bias, frozen):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40, bias=bias)
    lin = mm.Linear(24, 40, bias=bias)
    lin.load_state_dict(ref.state_dict())
    for layer in (ref, lin):
        layer.weight.requires_grad_(not frozen)
    x = torch.randn(3, 5, 24)  # leading dims are flattened and restored
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), lin(x2)
    assert y2.shape == (3, 5, 40)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    if frozen:
        assert lin.weight.grad is None
    else:
        torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    lin = mm.Linear(8, 4)
    assert isinstance(lin, nn.Linear)
    assert set(lin.state_dict()) == set(nn.Linear(8, 4).state_dict())


def test_linear_without_grad_and_in_bf16_falls_back_cleanly():
    lin = mm.Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    xb, lb = x.bfloat16(), mm.Linear(8, 4).bfloat16()
    assert lb(xb).dtype == torch.bfloat16


@needs_onednn
def test_transformer_step_agrees_across_backends():
    """Loss and every gradient of a training step: oneDNN vs torch's MKL path, to fp32 rounding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, n_layer=2, d_model=64, n_head=4, max_seq_len=64))
    assert all(type(m) is mm.Linear for name, m in model.named_modules() if name.endswith(("_proj", "lm_head")))
    idx = torch.randint(0, 512, (2, 48))
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :5] = -100
    results = []
    for backend in ("onednn", "aten"):
        previous = mm.set_cpu_matmul(backend)
        try:
            model.zero_grad()
            _, loss = model(idx, targets)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        finally:
            mm.set_cpu_matmul(previous)
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        assert ((a - b).abs().max() / b.abs().max()) < 1e-4


@needs_onednn
def test_compiled_linear_matches_eager():
    """Under torch.compile the products are the opaque `lmforge::onednn_linear` op (inductor's own lowering fails)."""
    torch.manual_seed(0)
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=True)

    def f(x, w):
        return mm.linear(x, w).relu().pow(2).sum()

    f(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    torch.compile(f, fullgraph=True)(x, w).backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-5)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="onednn, aten"):
        mm.set_cpu_matmul("mkl")
    env = {**os.environ, "LMFORGE_CPU_MATMUL": "mkl"}
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "params", "--preset", "tiny"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "lmforge: error: LMFORGE_CPU_MATMUL must be one of onednn, aten, got 'mkl'"


def test_importing_registers_no_op_building_a_linear_does():
    import subprocess
    import sys

    code = (
        "import torch, lmforge.model.transformer as t\n"
        "ops = lambda: hasattr(torch.ops.lmforge, 'onednn_linear')\n"
        "before = ops(); t.Transformer(t.ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2))\n"
        "print(before, ops() or not torch.backends.mkldnn.is_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_the_default_backend_is_chosen_by_the_cpu_vendor():
    assert mm.default_backend("vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)") == "aten"
    assert mm.default_backend("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC") == "onednn"
    assert mm.default_backend("") == "onednn"  # no /proc/cpuinfo (macOS, Windows): oneDNN, as before
