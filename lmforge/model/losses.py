"""Cross-entropy through the output head in chunks, without materializing all logits.

    loss = linear_cross_entropy(hidden (N, d), head_weight (V, d), targets (N,))

Training a small model on a CPU, the (tokens x vocab) logits and their gradient are
the largest tensors of a step (16 x 256 tokens x 8192 vocab = 134 MB each in fp32)
and moving them through memory costs more than the matmul that makes them. Here the
head, softmax and its gradient run over `chunk` tokens at a time, and the gradients
of the hidden states and the head weight are computed in the forward pass (the loss
is a scalar, so backward only scales them). This is the "fused linear cross-entropy"
of Liger-Kernel (Hsu et al. 2024), written with plain torch ops.

    logp, entropy = linear_token_logprobs(hidden (N, d), head_weight (V, d), targets (N,))

The per-token form that preference and RL losses need (DPO, GRPO, PPO): log p(target) at each
row, and the entropy of each row's distribution (no gradient). Its output is not a scalar, so
the gradients cannot be formed ahead; backward recomputes each chunk's logits instead of
keeping them (the head's activation checkpointing): memory O(chunk x V), one more head product.
The callers pass only answer positions, so a prompt's logits are never made.
"""

from __future__ import annotations

import torch

from lmforge.model.matmul import mm_nn, mm_nt, mm_tn, onednn_applies

IGNORE_INDEX = -100


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = mm_nt(x, weight)
    return logits if logits.dtype == torch.float64 else logits.float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        grad_x = torch.empty_like(x)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
        grad_w = torch.zeros_like(weight, dtype=acc)
        total = torch.zeros((), dtype=acc, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xs, ts = x[s : s + chunk], targets[s : s + chunk]
            valid = ts != IGNORE_INDEX
            safe = ts.clamp(min=0)
            logp = torch.log_softmax(_chunk_logits(xs, weight), dim=-1)  # one fused pass over the chunk's logits
            total -= (logp.gather(1, safe[:, None]).squeeze(1) * valid).sum()
            # d(sum of losses)/d(logits) = softmax - onehot(target), zero on ignored rows; in place on the chunk.
            probs = logp.exp_()
            probs[torch.arange(len(ts), device=ts.device), safe] -= 1.0
            # Zero ignored rows; skipped when every row counts, checked only in eager CPU runs (on a GPU the
            # check would sync, and under torch.compile it would break the graph; there the multiply is cheap).
            if torch.compiler.is_compiling() or probs.device.type != "cpu" or not bool(valid.all()):
                probs.mul_(valid[:, None])
            g = probs.to(x.dtype)
            grad_x[s : s + chunk] = mm_nn(g, weight)
            if onednn_applies(g, xs):
                grad_w.add_(mm_tn(g, xs))
            elif g.dtype == xs.dtype == grad_w.dtype and not torch.is_autocast_enabled(xs.device.type):
                grad_w.addmm_(g.t(), xs)
            else:  # under autocast: the product in bf16 (as autograd would run it), accumulated in fp32
                grad_w.add_(g.t() @ xs)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total, grad_w * grad_total, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", chunk: int = 1024
) -> torch.Tensor:
    """Cross-entropy of softmax(x @ weight.T) against targets (IGNORE_INDEX rows skipped); mean or sum.

    Equal to F.cross_entropy(x @ weight.T, targets) (tested), in O(chunk x V) memory.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(x, weight, targets, chunk)
    else:
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            logits, ts = _chunk_logits(x[s : s + chunk], weight), targets[s : s + chunk]
            total += torch.nn.functional.cross_entropy(logits, ts, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def _token_logprobs(x, weight, targets, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(weight.dtype, torch.float32)
    logp = torch.empty(x.shape[0], dtype=acc, device=x.device)
    entropy = torch.empty_like(logp)
    for s in range(0, x.shape[0], chunk):
        lp = torch.log_softmax(_chunk_logits(x[s : s + chunk], weight), dim=-1)
        logp[s : s + chunk] = lp.gather(1, targets[s : s + chunk, None]).squeeze(1)
        entropy[s : s + chunk] = -(lp.exp() * lp).sum(-1)
    return logp, entropy


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        logp, entropy = _token_logprobs(x, weight, targets, chunk)
        ctx.save_for_backward(x, weight, targets)  # not the logits: backward makes them again, a chunk at a time
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        x, weight, targets = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(x.dtype)  # as autocast made the forward's logits (backward runs outside autocast)
        grad_x = torch.empty_like(x) if want_x else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None  # a frozen head (LoRA) gets none
        for s in range(0, x.shape[0], ctx.chunk):
            xs, ts, gs = x[s : s + ctx.chunk], targets[s : s + ctx.chunk], grad_logp[s : s + ctx.chunk]
            # d log p(t) / d logits = onehot(t) - softmax, scaled per row by the incoming gradient; in place.
            probs = torch.softmax(_chunk_logits(xs, w), dim=-1)
            probs.mul_(-gs[:, None].to(probs.dtype))
            probs[torch.arange(len(ts), device=ts.device), ts] += gs.to(probs.dtype)
            g = probs.to(x.dtype)
            if want_x:
                grad_x[s : s + ctx.chunk] = mm_nn(g, w)
            if want_w:
                grad_w.add_(mm_tn(g, xs) if onednn_applies(g, xs) else g.t().to(acc) @ xs.to(acc))
        return grad_x, (grad_w.to(weight.dtype) if want_w else None), None, None


def linear_token_logprobs(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) (N,), entropy (N,)) of softmax(x @ weight.T) per row, in fp32, in O(chunk x V) memory.

    Equal to log_softmax(x @ weight.T).gather(targets) and its entropy (tested, gradients too); the
    entropy carries no gradient. Every target must be a real id (select the answer rows first).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearTokenLogprobs.apply(x, weight, targets, chunk)
    with torch.no_grad():
        return _token_logprobs(x, weight, targets, chunk)
