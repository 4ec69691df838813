"""Evaluation tasks by name: multiple-choice sets built offline from data that installs here, and task files.

    from lmforge.eval.tasks import task_items
    items = task_items("shakespeare-next")          # or chatterbot-en, chatterbot-zh, mc:PATH
    items = task_items("mc:data/ceval/val/")        # MMLU / C-Eval / CMMLU CSV files, or JSONL

Built-in sets (fixed seed, so every model is scored on the same items; 4 choices each, chance 0.25):
- shakespeare-next (English): three consecutive lines of a play, then which of four lines comes next: the
  true one, or three lines of the same play drawn at random (lines of 20+ characters). In-domain for the
  demo models, which pretrain on Shakespeare (all of it but the validation share): it measures whether a
  model follows the text, not knowledge.
- chatterbot-en, chatterbot-zh: a question from chatterbot-corpus (English / Chinese), and which of four
  answers belongs to it: its own, or the answers of three other questions (questions and answers of at
  most 150 UTF-8 bytes, which any model here scores whole). The Chinese demo's SFT data
  includes chatterbot's Chinese conversations; the English demo's does not (it tunes on chitchat).
"""

from __future__ import annotations

import math
import random
import re

from lmforge.errors import LmforgeError
from lmforge.eval.mc import Item, read_items

BUILTIN = ("shakespeare-next", "chatterbot-en", "chatterbot-zh")
N_ITEMS = 500
MIN_LINE = 20
# Chatterbot questions and answers longer than this (UTF-8 bytes) are left out of the sets, so that any model
# scores them whole: 150 bytes is at most 150 tokens of a byte-level BPE, 50 Chinese characters.
MAX_BYTES = 150


def _short(text: str) -> bool:
    return len(text.encode("utf-8")) <= MAX_BYTES


def _shakespeare_next(n: int, seed: int) -> list[Item]:
    from lmforge.data.corpora import shakespeare_files

    rng = random.Random(seed)
    plays = []
    for path in shakespeare_files():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if len(ln) >= MIN_LINE and not ln.isupper() and not ln.startswith("[")]
        if len(lines) > 100:
            plays.append((path.stem.removesuffix("_gut"), lines))
    items = []
    for k in range(n):
        name, lines = plays[rng.randrange(len(plays))]
        i = rng.randrange(3, len(lines) - 1)
        near = set(lines[i - 3 : i + 1])
        distractors = []
        while len(distractors) < 3:
            cand = lines[rng.randrange(len(lines))]
            if cand not in near and cand not in distractors:
                distractors.append(cand)
        answer = rng.randrange(4)
        choices = distractors[:answer] + [lines[i]] + distractors[answer:]
        context = "\n".join(lines[i - 3 : i]) + "\n"
        items.append(
            Item(context, choices, answer, "shakespeare", "en", f"shakespeare-next:{k}:{name}", context_only=True)
        )
    return items


def _chatterbot(lang: str, n: int, seed: int) -> list[Item]:
    from lmforge.chat.datasets import load_conversations

    cs = load_conversations("chatterbot", languages=(lang,))
    pairs, seen = [], set()
    for conv in cs.conversations:
        user = next((m["content"] for m in conv if m["role"] == "user"), None)
        reply = next((m["content"] for m in conv if m["role"] == "assistant"), None)
        # Short enough to score whole on a small model (a few chatterbot answers are essays).
        if user and reply and user not in seen and _short(user) and _short(reply):
            seen.add(user)
            pairs.append((user.strip(), reply.strip()))
    rng = random.Random(seed)
    order = rng.sample(range(len(pairs)), min(n, len(pairs)))
    answers = sorted({a for _, a in pairs})
    items = []
    for k, j in enumerate(order):
        q, a = pairs[j]
        distractors = []
        while len(distractors) < 3:
            cand = answers[rng.randrange(len(answers))]
            if cand != a and cand not in distractors:
                distractors.append(cand)
        answer = rng.randrange(4)
        choices = distractors[:answer] + [a] + distractors[answer:]
        code = "zh" if lang == "chinese" else "en"
        items.append(Item(q, choices, answer, "chatterbot", code, f"chatterbot-{code}:{k}"))
    return items


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `c` right answers among `n` samples (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): 1 - C(n - c, k) / C(n, k), as a product so large n cannot overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def generative_result(model, tok_dir, name: str, n: int, seed: int, samples: int, temperature: float,
                      max_new_tokens: int) -> dict:  # fmt: skip
    """`task:NAME`: greedy exact match on `n` held-out prompts of a verifiable task (lmforge/align/tasks.py), and
    with `samples` > 1 the unbiased pass@k for k = 1, 2, 4, ... up to `samples` at `temperature`."""
    from lmforge.align.rollout import prompt_ids, sample, task_accuracy
    from lmforge.align.tasks import get_task, make_split
    from lmforge.chat.template import ChatFormat

    task = get_task(name)
    fmt = ChatFormat(tok_dir)
    if not fmt.stop_ids:
        raise LmforgeError(f"{tok_dir}: the tokenizer has no turn-end token to stop answers at (task:{name})")
    items = make_split(task, n, seed, "eval")
    greedy = task_accuracy(model, fmt, task, items, max_new_tokens)
    result = {"n": len(items), "exact_match": greedy["accuracy"], "exact_match_lo": greedy["accuracy_lo"],
              "exact_match_hi": greedy["accuracy_hi"], "mean_length": greedy["mean_length"],
              "ended": greedy["ended"]}  # fmt: skip
    if samples > 1:
        outs, _ = sample(model, prompt_ids(fmt, [q for q, _ in items]), samples, max_new_tokens,
                         temperature=temperature, seed=seed, stop_ids=fmt.stop_ids)  # fmt: skip
        right = [task.reward(fmt.tokenizer.decode(o), items[i // samples][1]) == 1.0 for i, o in enumerate(outs)]
        counts = [sum(right[i * samples : (i + 1) * samples]) for i in range(len(items))]
        ks = sorted({2**i for i in range(samples.bit_length()) if 2**i <= samples} | {samples})
        result["pass_at_k"] = {str(k): sum(pass_at_k(samples, c, k) for c in counts) / len(items) for k in ks}
        result.update(samples=samples, temperature=temperature)
    return result


def task_items(spec: str, seed: int = 0) -> list[Item]:
    """The items of a task: a built-in set by name, or `mc:PATH` (a task file or folder)."""
    if spec == "shakespeare-next":
        return _shakespeare_next(N_ITEMS, seed)
    if spec in ("chatterbot-en", "chatterbot-zh"):
        return _chatterbot("english" if spec.endswith("en") else "chinese", N_ITEMS, seed)
    if spec.startswith("mc:"):
        return read_items(spec[3:])
    raise LmforgeError(
        f"unknown task {spec!r}: built-in {', '.join(BUILTIN)}, or mc:FILE_OR_DIR, ppl:FILE_OR_DIR, task:NAME"
    )


def task_name(spec: str) -> str:
    """A file-name-safe name for a task spec (results go to items_<name>.jsonl)."""
    name = spec.replace("mc:", "").replace("ppl:", "ppl_").replace("task:", "task_")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"
