"""The math of stage 3 as small pure functions (tensors in, tensors out), unit-tested by hand.

    from lmforge.align.losses import PREFERENCE_LOSSES, reward_ranking_loss, gae, grpo_advantages
    loss, chosen_r, rejected_r = PREFERENCE_LOSSES["dpo"](pi_c, pi_r, ref_c, ref_r, beta=0.1)
    rewards = kl_shaped_rewards(scores, kl, mask, kl_coef=0.05)   # PPO: per-token rewards, then gae()

Log-probabilities here are per sequence (the sum over answer tokens) unless the name says
per token; masks are 1 on answer tokens and 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry pairwise loss of a reward model: mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, **_):  # **_: the other losses' arguments
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]).

    Returns (mean loss, implicit reward of chosen, of rejected), rewards = beta * (pi - ref).
    """
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def ipo_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, len_c=None, len_r=None, per_token: bool = True, **_):
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2 with h the log-ratio margin, a bounded target.

    Azar et al. (and TRL) average the log-probabilities over answer tokens: with the lengths
    given and `per_token`, each sum is divided by its answer's length first (`lmforge dpo`'s
    default); without them, or per_token False (`--set ipo_logps=sum`), sums as DPO uses them,
    where the target 1/(2 beta) binds long answers much less.
    """
    if per_token and len_c is not None:
        len_c, len_r = len_c.clamp(min=1), len_r.clamp(min=1)
        pi_c, pi_r, ref_c, ref_r = pi_c / len_c, pi_r / len_r, ref_c / len_c, ref_r / len_r
    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach()


def simpo_loss(pi_c, pi_r, ref_c=None, ref_r=None, beta=2.0, gamma=0.5, len_c=None, len_r=None, **_):
    """SimPO (Meng et al. 2024): no reference; length-normalized rewards beta * logp / |y| with margin gamma."""
    chosen, rejected = beta * pi_c / len_c, beta * pi_r / len_r
    return -F.logsigmoid(chosen - rejected - gamma).mean(), chosen.detach(), rejected.detach()


PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "simpo": simpo_loss}


def chosen_nll(pi_c: torch.Tensor, len_c: torch.Tensor) -> torch.Tensor:
    """RPO's extra term (Pang et al. 2024): the chosen answers' mean per-token negative log-likelihood."""
    return (-pi_c / len_c.clamp(min=1)).mean()


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Estimate of KL(policy || reference) per sampled token (Schulman, "Approximating KL divergence").

    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(ref - logp) - (ref - logp) - 1
    (unbiased, always >= 0, lower variance; what GRPO uses).
    """
    if kind == "k1":
        return logp - ref_logp
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's reward standardized within its group of G samples of one prompt.

    rewards (N*G,) ordered prompt by prompt -> advantages (N*G,). A group whose rewards are all
    equal gets advantage 0 (nothing to learn from it).
    """
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=True) + eps)).view(-1)


def policy_gradient_loss(logp, old_logp, advantages, mask, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, averaged over answer tokens.

    logp/old_logp (B, T) per-token log-probs of the sampled tokens now and at sampling time;
    advantages (B, T) or (B,) (broadcast over tokens, as in GRPO).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -masked_mean(surrogate, mask)


def value_loss(values, old_values, returns, mask, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), averaged over answer tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation (Schulman et al. 2016) over each row's answer tokens.

    rewards, values, mask: (B, T); the mask is 1 on one contiguous run of answer tokens per row,
    and the episode ends after its last one (the value there is 0). Returns (advantages,
    returns), both (B, T), zero off the mask.
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    """
    T = rewards.shape[1]
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        more = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # 0 after the answer's last token
        next_value = values[:, t + 1] * more if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * more) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards (Ziegler et al. 2019, InstructGPT, TRL): -kl_coef * KL at every answer token,
    plus the sequence's scalar score at its last answer token (the turn-end token when the answer ended; TRL's
    PPOTrainer adds it one position later, at the first padding token after the answer, when there is one).

    scores (B,), kl (B, T) per-token KL estimate of the sampled tokens, mask (B, T) one contiguous
    run of answer tokens per row -> rewards (B, T), zero off the mask.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (m * torch.arange(m.shape[1], device=m.device)).argmax(1)  # index of each row's last answer token
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows, last] += scores.to(rewards.dtype) * m[rows, last]
    return rewards


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x standardized over its masked entries (mean 0, unit variance there), zero off the mask.

    The variance is the biased one (divided by n); TRL's `masked_whiten` divides by n - 1 (Bessel), which makes its
    whitened values smaller by sqrt((n - 1) / n): 0.2% at 256 answer tokens, nothing that changes a run.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked entries: 1 is a perfect critic, <= 0 a useless one."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1.0 - var_d / var_r.clamp(min=1e-12)
