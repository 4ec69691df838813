"""Sampling answers from a policy and turning them into training rows (GRPO, PPO, best-of-N).

    outs, ended = sample(model, prompts, n=8, max_new_tokens=32, temperature=1.0, seed=0, stop_ids=fmt.stop_ids)
    batch = rows(prompts_repeated, outs, ended, stop_id, pad_id)   # idx, targets on the answers only
    accuracy = task_accuracy(model, fmt, task, items, max_new_tokens=32)   # greedy exact match

Rollouts use the KV-cache generator (lmforge/serve/generate.py). A row is prompt + answer,
plus the turn-end token when the answer ended with it: the policy is then trained (and
rewarded) for stopping, and an answer cut by `max_new_tokens` is counted as not ended.
"""

from __future__ import annotations

import torch

from lmforge.align.batching import collate
from lmforge.eval.stats import wilson_interval
from lmforge.serve.generate import generate


def sample(model, prompts, n, max_new_tokens, *, temperature=1.0, top_p=1.0, seed=0, stop_ids=(), chunk=64):
    """n answers per prompt (prompt-major order) -> (answers' token lists, ended at a stop token)."""
    flat = [p for p in prompts for _ in range(n)]
    outs = []
    for i in range(0, len(flat), chunk):
        outs += generate(model, flat[i : i + chunk], max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed + i, stop_ids=stop_ids, pad_id=stop_ids[0] if stop_ids else 0)  # fmt: skip
    ended = [len(o) < max_new_tokens for o in outs]
    return outs, ended


def rows(prompts, outs, ended, stop_id: int, pad_id: int, device="cpu") -> dict:
    """Training rows: prompt + answer (+ stop token if it ended), targets on the answer tokens only."""
    sides = []
    for p, o, e in zip(prompts, outs, ended, strict=True):
        answer = list(o) + ([stop_id] if e else [])
        if not answer:  # an immediate stop still trains the stop token; nothing at all has no target
            answer = [stop_id]
        sides.append((list(p) + answer, [False] * len(p) + [True] * len(answer)))
    return collate(sides, pad_id, device)


def answer_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token log-probs of the targets, answer mask, per-token entropy), each (B, T)."""
    from lmforge.align.losses import entropy_per_token, token_logprobs

    logits, _ = model(batch["idx"])
    mask = batch["targets"] != -100
    return token_logprobs(logits, batch["targets"]), mask, entropy_per_token(logits.detach())


@torch.no_grad()
def task_accuracy(model, fmt, task, items, max_new_tokens: int, system: str | None = None) -> dict:
    """Greedy exact-match accuracy on (question, answer) items, with its 95% interval and mean length."""
    prompts = [fmt.encode(_messages(q, system), add_generation_prompt=True) for q, _ in items]
    outs, ended = sample(model, prompts, 1, max_new_tokens, temperature=0.0, stop_ids=fmt.stop_ids)
    right = sum(task.reward(fmt.tokenizer.decode(o), a) == 1.0 for o, (_, a) in zip(outs, items, strict=True))
    lo, hi = wilson_interval(right, len(items))
    return {"accuracy": right / len(items), "accuracy_lo": lo, "accuracy_hi": hi, "prompts": len(items),
            "mean_length": sum(map(len, outs)) / len(outs), "ended": sum(ended) / len(ended),
            "tokens_generated": sum(map(len, outs))}  # fmt: skip


def _messages(question: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def prompt_ids(fmt, questions, system: str | None = None) -> list[list[int]]:
    return [fmt.encode(_messages(q, system), add_generation_prompt=True) for q in questions]
