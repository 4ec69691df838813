"""Verifiable tasks: a generator of (prompt, answer), a prompt format and a programmatic reward.

    from lmforge.align.tasks import TASKS, make_split
    task = TASKS["add"]
    items = make_split(task, n=200, seed=0, split="eval")    # [(prompt, answer), ...], disjoint from "train"
    task.reward("The answer is 579.", "579")                  # 1.0 when the final number equals the answer

Each task's prompts come from a seeded generator; `split` salts the seed and the train and
eval sets are kept disjoint by prompt, so held-out accuracy is held out. The reward reads
the *last* answer-looking span of the response (a number, or a bracketed list), compares it
exactly, and gives 1.0 or 0.0; `format_bonus` (default 0) can reward a parseable answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.errors import LmforgeError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LIST = re.compile(r"\[([^\[\]]*)\]")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def last_list(text: str) -> str | None:
    found = _LIST.findall(text)
    if not found:
        return None
    return "[" + ", ".join(x.strip() for x in found[-1].split(",") if x.strip()) + "]"


def _same_number(got: str | None, want: str) -> bool:
    if got is None:
        return False
    try:
        return abs(float(got) - float(want)) < 1e-9
    except ValueError:
        return False


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    generate: Callable[[random.Random], tuple[str, str]]  # rng -> (question, answer)
    extract: Callable[[str], str | None]  # response -> the answer it gives, or None
    equal: Callable[[str | None, str], bool]

    def reward(self, response: str, answer: str, format_bonus: float = 0.0) -> float:
        got = self.extract(response)
        if self.equal(got, answer):
            return 1.0
        return format_bonus if got is not None else 0.0


def _add(rng: random.Random) -> tuple[str, str]:
    digits = rng.choice([1, 2, 2, 3])
    a, b = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits), rng.randrange(10**digits)
    return f"What is {a} + {b}?", str(a + b)


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 1000), rng.randrange(2, 10)
    return f"What is {a} * {b}?", str(a * b)


def _mul_long(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100, 10000), rng.randrange(10, 1000)
    return f"What is {a} * {b}?", str(a * b)


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randrange(10) for _ in range(rng.randrange(3, 6))]
    return f"Sort the list [{', '.join(map(str, xs))}] in ascending order.", "[" + ", ".join(map(str, sorted(xs))) + "]"


def _reverse(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randrange(10) for _ in range(rng.randrange(3, 6))]
    return f"Reverse the list [{', '.join(map(str, xs))}].", "[" + ", ".join(map(str, xs[::-1])) + "]"


_UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]


def _convert(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randrange(1, 1000)
    return f"How many {small} are in {n} {big}?", str(n * factor)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("add", "add two numbers of up to 3 digits", _add, last_number, _same_number),
        Task("mul", "multiply a 2-3 digit by a 1-digit number", _mul, last_number, _same_number),
        Task(
            "mul-long",
            "multiply a 3-4 digit by a 2-3 digit number (the calculator's task)",
            _mul_long,
            last_number,
            _same_number,
        ),
        Task("sort", "sort a list of 3-5 digits", _sort, last_list, lambda got, want: got == want),
        Task("reverse", "reverse a list of 3-5 digits", _reverse, last_list, lambda got, want: got == want),
        Task("convert", "convert between metric/time units", _convert, last_number, _same_number),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LmforgeError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_split(task: Task, n: int, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """n distinct (question, answer) items; "eval" items never appear in "train" (for any n, same seed)."""
    if split not in ("train", "eval"):
        raise ValueError("split must be train or eval")
    rng = random.Random(f"{task.name}:{seed}")  # one stream; items are assigned to splits by a hash of the prompt
    items, seen = [], set()
    for _ in range(200 * n + 1000):
        q, a = task.generate(rng)
        if q in seen:
            continue
        seen.add(q)
        if (_stable_hash(q) % 5 == 0) == (split == "eval"):  # ~20% of the prompt space is eval-only
            items.append((q, a))
            if len(items) == n:
                return items
    raise LmforgeError(f"task {task.name}: only {len(items)} distinct {split} prompts exist, asked for {n}")


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def answer_text(task: Task, answer: str) -> str:
    """The reference response an SFT warm-up trains on: the answer in the format the reward reads."""
    return f"The answer is {answer}."
