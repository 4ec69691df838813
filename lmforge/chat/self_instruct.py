"""Self-Instruct (Wang et al. 2022): a model writes new instructions from a few seed tasks, filters keep the novel
and usable ones, and the model answers them: SFT data made by a model instead of annotators.

    lmforge self-instruct --model models/smollm2 --seeds seeds.jsonl --n 200 --out generated.jsonl
    lmforge sft --model models/smollm2 --data generated.jsonl --out runs/self-instruct --lora

Seeds: JSONL records {"instruction", "input" (optional), "output" (optional)}, or {"messages": [...]} whose first
user turn is taken. Each round shows the model `--shots` instructions (mostly seeds, some earlier generated
ones, as the paper mixes 6 and 2) numbered, asks for new ones continuing the list, and parses the numbered lines.
A candidate is dropped, and counted under its reason, when it is:
- too short (under 3 words) or too long (over 150 words),
- about what a text model cannot do (image, picture, graph, file, map, draw, plot, video, audio, music, flowchart,
  diagram: the paper's list),
- starting with punctuation or a digit,
- already in the pool, or too similar to an instruction in it (ROUGE-L F1 above 0.7, the paper's threshold;
  `rouge_l` here, words and CJK characters as tokens, so Chinese works too).
Kept instructions go into the pool at once (so later candidates must differ from them too), then each is answered
(greedy); an empty answer, or one cut at --max-new-tokens, drops the task. The output is `messages` JSONL that
`lmforge sft` reads, and a report (`<out>.report.json`) counts every filter. Rounds stop at --n kept tasks or after
--max-rounds.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.errors import LmforgeError

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # fmt: skip
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_NUMBERED = re.compile(r"^\s*(?:task\s*)?(\d{1,3})\s*[.):：、]\s*(.+?)\s*$", re.IGNORECASE)


def tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists: the longest common subsequence's precision and recall, harmonic mean."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


class Pool:
    """The instructions so far (seeds and kept ones), checked for novelty by ROUGE-L."""

    def __init__(self, instructions: list[str], threshold: float = 0.7):
        self.threshold = threshold
        self.items: list[tuple[str, list[str]]] = []
        self.seen: set[str] = set()
        for text in instructions:
            self.add(text)

    def add(self, text: str) -> None:
        self.items.append((text, tokens(text)))
        self.seen.add(" ".join(tokens(text)))

    def rejection(self, text: str) -> str | None:
        """Why `text` cannot join the pool (a filter's name), or None when it can."""
        toks = tokens(text)
        if " ".join(toks) in self.seen:
            return "duplicate"
        n = len(toks)
        for _, other in self.items:
            m = len(other)
            if 2 * min(n, m) / (n + m) <= self.threshold:  # even a full overlap could not pass the threshold
                continue
            if rouge_l(toks, other) > self.threshold:
                return "too similar to the pool (ROUGE-L > 0.7)"
        return None


def rule_rejection(text: str) -> str | None:
    """The paper's rule filters on one candidate instruction: the reason it fails, or None."""
    words = tokens(text)
    if len(words) < 3:
        return "too short (< 3 words)"
    if len(words) > 150:
        return "too long (> 150 words)"
    lowered = f" {text.lower()} "
    if any(re.search(rf"\b{re.escape(k)}\b", lowered) for k in BLACKLIST):
        return "about images, files or sound (blacklisted word)"
    if not (text[0].isalpha()):
        return "starts with punctuation or a digit"
    return None


def parse_numbered(reply: str) -> tuple[list[str], int]:
    """(instructions on numbered lines, count of other non-empty lines)."""
    found, other = [], 0
    for line in reply.splitlines():
        m = _NUMBERED.match(line)
        if m:
            found.append(m.group(2).strip().strip('"'))
        elif line.strip():
            other += 1
    return found, other


def prompt_for(examples: list[str], first_number: int) -> str:
    listing = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, start=1))
    return (f"Here is a list of diverse tasks, each an instruction a person could give an AI assistant:\n\n{listing}\n\n"
            f"Continue the list with new tasks that are different from these. Write one task per line, numbered "
            f"from {first_number}.")  # fmt: skip


def read_seeds(path: str) -> list[str]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: cannot read the seeds ({e})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{i}: not JSON ({e.msg})") from None
        text = None
        if isinstance(rec, dict) and isinstance(rec.get("instruction"), str):
            text = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            text = next((m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"),
                        None)  # fmt: skip
        if not isinstance(text, str) or not text.strip():
            raise LmforgeError(f'{path}:{i}: a seed needs an "instruction" (or a user message)')
        out.append(text.strip())
    if len(out) < 2:
        raise LmforgeError(f"{path}: needs at least 2 seed tasks, found {len(out)}")
    return out


def self_instruct(generate, seeds: list[str], n: int, shots: int = 8, per_round: int = 8, max_rounds: int = 200,
                  seed: int = 0, progress=None) -> tuple[list[dict], dict]:  # fmt: skip
    """(records, report). `generate(prompt_text, max_new_tokens, sample) -> (reply, finished)` is the model in one
    user turn (`sample`: sampled, for the instruction lists; else greedy); `finished` is False when the reply was cut
    at max_new_tokens."""
    rng = random.Random(seed)
    pool = Pool(seeds)
    kept: list[str] = []
    dropped: Counter = Counter()
    candidates = rounds = 0
    records = []
    while len(records) < n and rounds < max_rounds:
        rounds += 1
        n_machine = min(len(kept), shots // 4)
        examples = rng.sample(seeds, min(len(seeds), shots - n_machine)) + rng.sample(kept, n_machine)
        rng.shuffle(examples)
        reply, _ = generate(prompt_for(examples, len(examples) + 1), 48 * per_round, True)
        found, other = parse_numbered(reply)
        dropped["not a numbered line"] += other
        for text in found[:per_round]:
            candidates += 1
            why = rule_rejection(text) or pool.rejection(text)
            if why:
                dropped[why] += 1
                continue
            pool.add(text)
            kept.append(text)
            answer, finished = generate(text, 256, False)
            if not answer.strip():
                dropped["empty answer"] += 1
                continue
            if not finished:
                dropped["answer cut at max_new_tokens"] += 1
                continue
            records.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]})
            if progress:
                progress(len(records))
            if len(records) == n:
                break
    report = {"seeds": len(seeds), "rounds": rounds, "candidates": candidates, "kept": len(records),
              "dropped": dict(dropped.most_common())}  # fmt: skip
    return records, report


@dataclass(frozen=True)
class SelfInstructConfig:
    """`lmforge self-instruct`: each field's comment is its help text."""

    model: str = ""  # the chat model that writes instructions and answers
    seeds: str = ""  # JSONL of seed tasks ({"instruction", "input"?, "output"?} or {"messages"})
    n: int = 100  # tasks to generate
    out: str = ""  # the JSONL to write (messages format, what lmforge sft reads); a report goes beside it
    shots: int = 8  # example instructions shown per round (a quarter of them earlier generated ones)
    per_round: int = 8  # most new instructions taken from one reply
    max_rounds: int = 200  # stop after this many rounds even if --n is not reached
    temperature: float = 0.7  # sampling for the instruction lists (answers are greedy)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> SelfInstructConfig:
        require([(bool(self.model), "needs --model"), (bool(self.seeds), "needs --seeds (a JSONL of seed tasks)"),
                 (bool(self.out), "needs --out"), (self.n >= 1, "n must be >= 1"), (self.shots >= 2, "shots >= 2"),
                 (self.per_round >= 1, "per_round >= 1"), (self.temperature >= 0, "temperature >= 0")])  # fmt: skip
        return self


def register(subparsers) -> None:
    add_config_command(subparsers, "self-instruct", "generate instruction data from seed tasks (Self-Instruct)",
                       SelfInstructConfig, run, description=__doc__)  # fmt: skip


def run(cfg: SelfInstructConfig) -> dict:
    from tqdm import tqdm

    from lmforge.chat.template import ChatFormat
    from lmforge.fileio import atomic_write_json, atomic_write_text
    from lmforge.serve.generate import generate
    from lmforge.train.checkpoint import load_for_inference
    from lmforge.train.common import pick_device

    seeds = read_seeds(cfg.seeds)
    model, tok_dir, _ = load_for_inference(cfg.model, device=pick_device(cfg.device))
    fmt = ChatFormat(tok_dir)
    calls = [0]

    def gen(text: str, max_new: int, sample: bool) -> tuple[str, bool]:
        calls[0] += 1
        ids = fmt.encode([{"role": "user", "content": text}], add_generation_prompt=True)
        max_new = min(max_new, model.cfg.max_seq_len // 2)
        out = generate(model, [ids[-(model.cfg.max_seq_len - max_new) :]], max_new, stop_ids=fmt.stop_ids,
                       temperature=cfg.temperature if sample else 0.0, top_p=0.95, seed=cfg.seed + calls[0])[0]  # fmt: skip
        return fmt.tokenizer.decode(out).strip(), len(out) < max_new

    with tqdm(total=cfg.n, desc="self-instruct", unit="task") as bar:
        records, report = self_instruct(gen, seeds, cfg.n, cfg.shots, cfg.per_round, cfg.max_rounds, cfg.seed,
                                        progress=lambda k: bar.update(k - bar.n))  # fmt: skip
    atomic_write_text(cfg.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(f"{cfg.out}.report.json", report)
    print(f"lmforge self-instruct: {report['kept']} tasks from {report['candidates']} candidates in "
          f"{report['rounds']} rounds -> {cfg.out}; dropped: {report['dropped']}", file=sys.stderr)  # fmt: skip
    return report
