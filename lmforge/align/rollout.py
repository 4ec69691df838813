"""Sampling answers from a policy and turning them into training rows (GRPO, PPO, best-of-N).

    outs, ended = sample(model, prompts, n=8, max_new_tokens=32, temperature=1.0, seed=0, stop_ids=fmt.stop_ids)
    batch = rows(prompts_repeated, outs, ended, stop_id, pad_id)   # idx, targets on the answers only
    accuracy = task_accuracy(model, fmt, task, items, max_new_tokens=32)   # greedy exact match
    prompts, skipped = load_prompts("prompts.jsonl"); train, held = split_prompts(prompts, 100, seed=0)
    scorer = RewardModelScorer("runs/rm", policy_tokenizer_dir); scorer(prompts, answer_texts)  # (N,) scores

Rollouts use the KV-cache generator (lmforge/serve/generate.py). A row is prompt + answer,
plus the turn-end token when the answer ended with it: the policy is then trained (and
rewarded) for stopping, and an answer cut by `max_new_tokens` is counted as not ended.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmforge.align.batching import collate, collate_shared, encode_side
from lmforge.errors import LmforgeError
from lmforge.eval.stats import mcnemar_exact, wilson_interval
from lmforge.fileio import atomic_write_json
from lmforge.serve.generate import generate


def sample(model, prompts, n, max_new_tokens, *, temperature=1.0, top_p=1.0, seed=0, stop_ids=(), chunk=64):
    """n answers per prompt (prompt-major order) -> (answers' token lists, ended at a stop token)."""
    flat = [p for p in prompts for _ in range(n)]
    outs = []
    was_training = model.training
    model.eval()  # the policy without dropout: a stage's first rollout comes right after the loop's model.train()
    try:
        for i in range(0, len(flat), chunk):
            outs += generate(model, flat[i : i + chunk], max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed + i, stop_ids=stop_ids, pad_id=stop_ids[0] if stop_ids else 0)  # fmt: skip
    finally:
        model.train(was_training)
    ended = [len(o) < max_new_tokens for o in outs]
    return outs, ended


def rows(prompts, outs, ended, stop_id: int, pad_id: int, device="cpu", owner: list[int] | None = None) -> dict:
    """Training rows: prompt + answer (+ stop token if it ended), targets on the answer tokens only. `owner`
    (which distinct prompt each row continues): the prompts run once for all their answers (collate_shared)."""
    sides = []
    for p, o, e in zip(prompts, outs, ended, strict=True):
        answer = list(o) + ([stop_id] if e else [])
        if not answer:  # an immediate stop still trains the stop token; nothing at all has no target
            answer = [stop_id]
        sides.append((list(p) + answer, [False] * len(p) + [True] * len(answer)))
    return collate(sides, pad_id, device) if owner is None else collate_shared(sides, owner, pad_id, device)


def answer_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token log-probs of the targets, answer mask, per-token entropy), each (B, T), 0 off the answers.
    A batch with a "prefix" runs its shared prompts once (collate_shared); packed rows bring their positions and
    doc_ids (collate_packed)."""
    layout = {k: batch[k] for k in ("prefix", "positions", "doc_ids") if k in batch}
    hidden, _ = model(batch["idx"], return_hidden=True, **layout)
    logp, entropy = head_logprobs(model, hidden, batch["targets"])
    return logp, batch["targets"] != -100, entropy


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy (no gradient)), each (B, T) in fp32 and 0 where targets is -100, from the final hidden
    states (B, T, d): the output head runs on the answer positions only, a chunk at a time (the prompt's and the
    padding's logits are never made; lmforge/model/losses.py: linear_token_logprobs)."""
    from lmforge.model.losses import linear_token_logprobs

    mask = targets != -100
    head = getattr(model, "module", model).lm_head  # through a DDP wrapper
    logp, entropy = linear_token_logprobs(hidden[mask], head.weight, targets[mask])
    zeros = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device)
    return zeros.masked_scatter(mask, logp), zeros.masked_scatter(mask, entropy)


def kl_limit(max_kl: float):
    """`Hooks.check` for RL stages: a one-line reason to stop when a step's mean KL to the reference passes `max_kl`
    (0 = never), before the update, so the last checkpoint stays the last good policy."""

    def check(metrics: dict) -> str | None:
        kl = metrics.get("kl", 0.0)
        if max_kl and kl > max_kl:
            return (f"KL to the reference is {kl:.3g}, above max_kl={max_kl:g} "
                    "(lower the lr or raise the KL coefficient)")  # fmt: skip
        return None

    return check


@torch.no_grad()
def task_accuracy(model, fmt, task, items, max_new_tokens: int, system: str | None = None) -> dict:
    """Greedy exact-match accuracy on (question, answer) items, with its 95% interval and mean length."""
    prompts = [fmt.encode(question_messages(q, system), add_generation_prompt=True) for q, _ in items]
    outs, ended = sample(model, prompts, 1, max_new_tokens, temperature=0.0, stop_ids=fmt.stop_ids)
    correct = [task.reward(fmt.tokenizer.decode(o), a) == 1.0 for o, (_, a) in zip(outs, items, strict=True)]
    right = sum(correct)
    lo, hi = wilson_interval(right, len(items))
    return {"accuracy": right / len(items), "accuracy_lo": lo, "accuracy_hi": hi, "prompts": len(items),
            "mean_length": sum(map(len, outs)) / len(outs), "ended": sum(ended) / len(ended),
            "tokens_generated": sum(map(len, outs)), "correct": correct}  # fmt: skip


def save_eval_items(run_dir: Path, step: int, items, result: dict, write: bool = True) -> dict:
    """Write which held-out prompts were answered right at `step` (RUN/eval/step_N.json, for paired before/after
    comparisons: `paired_change`; `write` False on non-main ranks); returns the record without the per-prompt list."""
    result = dict(result)
    correct = result.pop("correct")
    if write:
        record = {"step": step, "questions": [q for q, _ in items], "correct": [int(c) for c in correct]}
        atomic_write_json(Path(run_dir) / "eval" / f"step_{step:08d}.json", record)
    return result


def paired_change(run_dir: Path, before: int, after: int) -> dict | None:
    """Fixed / broken held-out prompts between two saved evaluations of one run, with the exact McNemar p-value."""
    paths = [Path(run_dir) / "eval" / f"step_{s:08d}.json" for s in (before, after)]
    if not all(p.is_file() for p in paths):
        return None
    b, a = (json.loads(p.read_text()) for p in paths)
    if b["questions"] != a["questions"]:
        return None
    fixed = sum(1 for x, y in zip(b["correct"], a["correct"], strict=True) if not x and y)
    broken = sum(1 for x, y in zip(b["correct"], a["correct"], strict=True) if x and not y)
    return {"fixed": fixed, "broken": broken, "p_value": mcnemar_exact(fixed, broken)}


def question_messages(question: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def prompt_ids(fmt, questions, system: str | None = None) -> list[list[int]]:
    return [fmt.encode(question_messages(q, system), add_generation_prompt=True) for q in questions]


def load_prompts(path: str | Path, system: str | None = None) -> tuple[list[list[dict]], dict[str, int]]:
    """Prompts for RL or best-of-N from JSONL {"prompt": text or [messages]}: (message lists, skipped by reason).

    A text prompt is one user message; `system` is put first where a prompt has no system message.
    """
    from lmforge.align.prefs import as_prompt, read_checked_jsonl  # prompts read as preference pairs' are

    def check(record) -> tuple[list[dict] | None, str | None]:
        prompt = as_prompt(record.get("prompt")) if isinstance(record, dict) else None
        if prompt is None:
            return None, 'no usable "prompt" (text or messages)'
        if prompt[-1]["role"] == "assistant":
            return None, "prompt ends with an assistant turn"
        if system and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}, *prompt]
        return prompt, None

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f'{path}: no such prompts file (JSONL with a "prompt" field: text or messages)')
    prompts, skipped = read_checked_jsonl(path, check)
    if not prompts:
        raise LmforgeError(
            f"{path}: no usable prompt ({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'empty'})"
        )
    return prompts, skipped


def split_prompts(prompts: list, n_eval: int, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded choice of `n_eval` prompts held out (all but one at most), both in input order."""
    n_eval = min(n_eval, len(prompts) - 1)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(n_eval, 0)])
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


class RewardModelScorer:
    """A trained reward model (`lmforge reward`) as a scorer of (prompt messages, answer text) -> float.

    Each answer is rendered with the prompt through the chat template and read at its turn-end
    token, exactly as the reward model was trained (batching.encode_side), whether or not the
    sampled answer reached the turn end. Its tokenizer must be the policy's (hash-equal).
    """

    def __init__(self, path, policy_tokenizer_dir, device="cpu", batch_size: int = 16):
        from lmforge.align.reward import load_reward_model
        from lmforge.chat.template import ChatFormat
        from lmforge.tokenizer.special import tokenizer_hash

        self.model, self.head, tok_dir, _ = load_reward_model(path, device)
        ours, theirs = tokenizer_hash(policy_tokenizer_dir), tokenizer_hash(tok_dir)
        if ours != theirs:
            raise LmforgeError(f"{path}: the reward model's tokenizer ({theirs}) is not the policy's ({ours}); "
                               "train the reward model from the same base")  # fmt: skip
        self.model.requires_grad_(False)
        self.head.requires_grad_(False)
        self.fmt = ChatFormat(tok_dir)
        self.pad_id = self.fmt.stop_ids[0] if self.fmt.stop_ids else 0
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
        from lmforge.align.reward import scores

        keep = self.model.cfg.max_seq_len + 1  # collate feeds all but the last token
        out = []
        for i in range(0, len(answers), self.batch_size):
            sides = [encode_side(self.fmt, p, a) for p, a in zip(prompts[i : i + self.batch_size],
                                                               answers[i : i + self.batch_size], strict=True)]  # fmt: skip
            sides = [(ids[-keep:], trained[-keep:]) for ids, trained in sides]  # over-long: the oldest tokens go
            out.append(scores(self.model, self.head, collate(sides, self.pad_id, self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
