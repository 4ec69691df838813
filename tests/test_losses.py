"""The chunked head + cross-entropy equals the plain one, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.losses import linear_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_matches_cross_entropy(reduction, chunk):
    torch.manual_seed(0)
    x = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -100  # ignored positions
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-100, reduction=reduction)
    got = linear_cross_entropy(x, w, t, reduction, chunk=chunk)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    g_ref = torch.autograd.grad(ref * 1.7, (x, w))
    g_got = torch.autograd.grad(got * 1.7, (x, w))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_gradients_match_autograds():
    """Under autocast (CPU bf16 here; CUDA the same) the chunked loss takes the products in bf16, as autograd does
    for the plain head: value and both gradients agree with autograd's to bf16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(200, 32, requires_grad=True)
    w = (torch.randn(64, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 64, (200,))
    t[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)
        got = linear_cross_entropy(x, w, t, chunk=64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, w)), strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 2e-2


def test_no_grad_path_and_all_ignored():
    x, w = torch.randn(10, 4), torch.randn(6, 4)
    t = torch.randint(0, 6, (10,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, "sum"), F.cross_entropy(x @ w.t(), t, reduction="sum"))
    assert linear_cross_entropy(x, w, torch.full((10,), -100)).item() == 0.0


@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_token_logprobs_match_log_softmax(chunk, frozen_head):
    from lmforge.model.losses import linear_token_logprobs

    torch.manual_seed(0)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 16, dtype=torch.float64, requires_grad=not frozen_head)
    t = torch.randint(0, 30, (40,))
    lp_all = torch.log_softmax(x @ w.t(), dim=-1)
    ref = lp_all.gather(1, t[:, None]).squeeze(1)
    ref_entropy = -(lp_all.exp() * lp_all).sum(-1)
    got, entropy = linear_token_logprobs(x, w, t, chunk=chunk)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(entropy, ref_entropy.detach())
    assert not entropy.requires_grad
    weights = torch.randn(40, dtype=torch.float64)  # a per-token loss: each row's gradient scaled differently
    wrt = (x,) if frozen_head else (x, w)
    g_ref = torch.autograd.grad((ref * weights).sum(), wrt)
    g_got = torch.autograd.grad((got * weights).sum(), wrt)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(linear_token_logprobs(x, w, t, chunk=chunk)[0], ref.detach())
