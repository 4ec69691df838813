"""Logit distillation losses: small pure functions (logits in, masked mean out), chosen by name.

    from lmforge.train.distill_losses import DISTILL_LOSSES
    kd = DISTILL_LOSSES["forward_kl"](student_logits, teacher_logits, mask, temperature=2.0)   # (B, T, V) x2, (B, T)

Used by `lmforge distill` (lmforge/train/distill.py). Each loss is a divergence between the teacher's
next-token distribution t and the student's s at every position, summed over the vocabulary, averaged
over the positions where `mask` is true. Both distributions are softmax(logits / T) at temperature T,
and every loss is multiplied by T^2 (Hinton et al. 2015, "Distilling the knowledge in a neural network":
the gradients of the soft term scale as 1/T^2, so the product keeps its weight against the hard-label
cross-entropy when T changes). At T = 1 the factor is 1.

- `forward_kl`: KL(t || s) = sum t (log t - log s), Hinton's soft-target loss (up to the teacher's
  entropy, which has no gradient): mass-covering, the student spreads over everything the teacher allows.
- `reverse_kl`: KL(s || t), mode-seeking (MiniLLM, Gu et al. 2024): the student may drop modes it cannot fit.
- `jsd`: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), in TRL's
  convention (`GKDTrainer.generalized_jsd_loss`): with the mixture m = beta t + (1 - beta) s,
  JSD_beta = beta KL(t || m) + (1 - beta) KL(s || m); beta = 0 is forward KL(t || s) and beta = 1 reverse
  KL(s || t), taken as those exact divergences (JSD_beta / beta and JSD_beta / (1 - beta) tend to them at
  the ends; JSD_beta itself tends to 0 there, so in between it is small near the ends: 0 <= JSD_beta <=
  H(beta) = -beta log beta - (1 - beta) log(1 - beta), reached when t and s share no token).
  TRL divides the logits by T but does not multiply by T^2: ours is TRL's times T^2 (equal at T = 1).

The losses are computed in float32 at least, whatever the model's dtype (a bf16 softmax over 50k tokens loses
the tail the student should learn). Padded vocabulary rows (lmforge rounds rows up to a multiple of 64)
are the caller's to cut off: both logits must have the same last dimension, the tokenizer's size.
"""

from __future__ import annotations

import math

import torch


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays fp64


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the vocabulary. Log-probabilities must be finite (a token whose
    probability underflows to 0 adds 0 x finite = 0); a -inf logit would give NaN, and lmforge's models give none
    (a where() guarding it cost ~45% more time over a 49k vocabulary on CPU)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def forward_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(t || s), t and s at temperature T (Hinton et al. 2015)."""
    t, s = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return temperature**2 * _masked_mean(_kl(t, s), mask)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(s || t)."""
    t, s = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return temperature**2 * _masked_mean(_kl(s, t), mask)


def jsd(student_logits, teacher_logits, mask, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """T^2 * mean over masked positions of GKD's JSD_beta(t, s) (TRL's convention; beta 0 / 1: forward / reverse KL)."""
    t, s = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    if beta == 0.0:
        per_token = _kl(t, s)
    elif beta == 1.0:
        per_token = _kl(s, t)
    else:
        m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))  # log(beta t + (1 - beta) s), stably
        per_token = beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    return temperature**2 * _masked_mean(per_token, mask)


DISTILL_LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def hard_label_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy against the data (-100 targets skipped): the hard term mixed in by `alpha`."""
    logits = _at_least_fp32(student_logits)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-100)  # fmt: skip
