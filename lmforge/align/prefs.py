"""Preference pairs: reading `prompt`/`chosen`/`rejected` JSONL, and building pairs from real signals.

    lmforge prefs --source chitchat --out pairs/chitchat.jsonl          # human ratings on the same starter prompt
    lmforge prefs --source task:add --n 2000 --out pairs/add.jsonl       # a verified answer vs a wrong one
    lmforge prefs --source task:add --n 5000 --sft --out sft/add.jsonl   # the verified answers alone (SFT warm-up)

A pair is {"prompt": [messages], "chosen": str, "rejected": str} (a plain-text prompt is read as
one user message; chosen/rejected may also be an assistant message or a list ending with one).
Pairs with identical chosen and rejected, an empty prompt or an empty answer, and malformed
lines are skipped and counted by reason, never silently dropped.

What the builders' pairs are, plainly:
- `chitchat`: chitchat-dataset conversations between two people given the same starter prompt,
  each rated by a human (witty, upbeat, interesting; 1-10 each). Two conversations on the same
  prompt whose rating sums differ by at least `min_gap` make a pair: the better-rated transcript
  (its first `turns` messages) is chosen. This is a judgement of whole conversations on a topic,
  not of two replies to one message; it trains a reward model of "a good chat", nothing more.
- `task:NAME`: a verifiable task's prompt, its correct answer ("The answer is 579.") chosen over
  a wrong one (the right answer perturbed: off by a small amount, or a list mis-sorted). Synthetic
  but exactly labelled.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_text


@dataclass
class PairSet:
    pairs: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""


def as_prompt(value) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    return None


def _as_answer(value) -> str | None:
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    elif isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")
    return value if isinstance(value, str) else None


def check_pair(record) -> tuple[dict | None, str | None]:
    """(pair, None) or (None, reason)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        return None, f"missing field {missing[0]!r}"
    prompt = as_prompt(record["prompt"])
    if prompt is None:
        return None, "empty or malformed prompt"
    chosen, rejected = _as_answer(record["chosen"]), _as_answer(record["rejected"])
    if chosen is None or rejected is None:
        return None, "chosen/rejected is not text or an assistant message"
    if not chosen.strip() or not rejected.strip():
        return None, "empty chosen or rejected"
    if chosen == rejected:
        return None, "identical chosen and rejected"
    if prompt[-1]["role"] == "assistant":
        return None, "prompt ends with an assistant turn"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def read_checked_jsonl(path: Path, check) -> tuple[list, dict[str, int]]:
    """Items of a JSONL file that `check(record) -> (item, None) | (None, reason)` accepts, and skips by reason.

    Blank lines are ignored; undecodable and malformed lines are counted, never fatal.
    """
    items, skipped = [], {}
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                item, reason = check(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                item, reason = None, "not UTF-8"
            except ValueError:
                item, reason = None, "malformed JSON"
            if item is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                items.append(item)
    return items, skipped


def load_pairs(path: str | Path) -> PairSet:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such preference file (JSONL with prompt, chosen, rejected)")
    pairs, skipped = read_checked_jsonl(path, check_pair)
    if not pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])[:3])
        raise LmforgeError(f"{path}: no usable preference pair ({reasons or 'empty file'})")
    return PairSet(pairs, skipped, str(path))


def split_pairs(pairs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out pairs by prompt: every pair of a prompt lands on the same side (no prompt leaks into val)."""
    by_prompt = defaultdict(list)
    for p in pairs:
        by_prompt[json.dumps(p["prompt"], sort_keys=True)].append(p)
    keys = sorted(by_prompt)
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(len(keys) * val_fraction)) if val_fraction > 0 and len(keys) > 1 else 0
    val_keys = set(keys[:n_val])
    train = [p for k in keys if k not in val_keys for p in by_prompt[k]]
    val = [p for k in keys if k in val_keys for p in by_prompt[k]]
    return train, val


def _transcript(conv: list[dict], turns: int) -> str:
    names = {"user": "A", "assistant": "B"}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in conv[:turns])


def chitchat_pairs(min_gap: int = 9, turns: int = 6, seed: int = 0) -> list[dict]:
    """Pairs of rated chitchat conversations on the same starter prompt (see the module docstring)."""
    from lmforge.chat.datasets import load_conversations

    cs = load_conversations("chitchat")
    groups = defaultdict(list)
    for conv, meta in zip(cs.conversations, cs.meta, strict=True):
        if meta.get("ratings") and meta.get("prompt"):
            groups[meta["prompt"]].append((sum(meta["ratings"].values()), conv))
    rng = random.Random(seed)
    pairs = []
    for prompt in sorted(groups):
        items = sorted(groups[prompt], key=lambda x: x[0])
        lo, hi = 0, len(items) - 1
        # Pair the worst with the best, inward, while the gap stays clear: each conversation used once.
        while lo < hi and items[hi][0] - items[lo][0] >= min_gap:
            (r_bad, bad), (r_good, good) = items[lo], items[hi]
            chosen, rejected = _transcript(good, turns), _transcript(bad, turns)
            if chosen != rejected:
                pairs.append({"prompt": [{"role": "user", "content": f"Chat about: {prompt}"}], "chosen": chosen,
                              "rejected": rejected, "ratings": [r_good, r_bad]})  # fmt: skip
            lo, hi = lo + 1, hi - 1
    rng.shuffle(pairs)
    return pairs


def _wrong(answer: str, rng: random.Random) -> str:
    if answer.startswith("["):
        items = answer[1:-1].split(", ")
        for _ in range(10):
            rng.shuffle(items)
            wrong = "[" + ", ".join(items) + "]"
            if wrong != answer:
                return wrong
        return "[" + ", ".join(items + ["0"]) + "]"
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return str(int(float(answer)) + delta)


def task_pairs(name: str, n: int, seed: int = 0) -> list[dict]:
    """Verified-correct vs wrong answers for `n` training prompts of a verifiable task."""
    from lmforge.align.tasks import answer_text, get_task, make_split

    task = get_task(name)
    rng = random.Random(seed)
    pairs = []
    for question, answer in make_split(task, n, seed, "train"):
        wrong = _wrong(answer, rng)
        pairs.append({"prompt": [{"role": "user", "content": question}], "chosen": answer_text(task, answer),
                      "rejected": answer_text(task, wrong)})  # fmt: skip
    return pairs


def chosen_as_sft(pairs: list[dict]) -> list[dict]:
    """The chosen answers alone as `messages` records for `lmforge sft` (a warm-up on verified answers)."""
    return [{"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]} for p in pairs]


def register(subparsers) -> None:
    p = subparsers.add_parser("prefs", help="build preference pairs from real signals (chitchat ratings, tasks)")
    p.add_argument("--source", required=True, help="chitchat, or task:NAME (add, mul, sort, reverse, convert)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--n", type=int, default=2000, help="task pairs to make (default 2000)")
    p.add_argument("--min-gap", type=int, default=9, help="chitchat: least rating-sum difference (default 9 of 3..30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft", action="store_true", help="write the chosen answers as `messages` JSONL for `lmforge sft`")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.source == "chitchat":
        pairs = chitchat_pairs(args.min_gap, seed=args.seed)
    elif args.source.startswith("task:"):
        pairs = task_pairs(args.source.split(":", 1)[1], args.n, args.seed)
    else:
        raise LmforgeError(f"--source must be chitchat or task:NAME, got {args.source!r}")
    if args.sft:
        pairs = chosen_as_sft(pairs)
    atomic_write_text(args.out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"lmforge prefs: {len(pairs)} {'conversations' if args.sft else 'pairs'} from {args.source} -> {args.out}")
    return 0
