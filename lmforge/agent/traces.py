"""Tool-use traces for fine-tuning: conversations in which the assistant calls a tool where one helps and answers
directly where none does, built from the verifiable tasks (lmforge/align/tasks.py).

    lmforge tool-traces --tasks mul-long,reverse --n 2000 --out traces.jsonl           # then: lmforge sft --data
    lmforge tool-traces --tasks mul-long,reverse --n 2000 --out direct.jsonl --direct  # the same, no tools (baseline)

A task with a tool (`add`, `mul`, `mul-long` -> calc; `convert` -> convert) becomes:

    system     the tool listing (lmforge/agent/loop.py's, so training and `lmforge agent` see the same text)
    user       What is 4821 * 377?
    assistant  <tool_call>{"name": "calc", "arguments": {"expression": "4821 * 377"}}</tool_call>
    tool       1817517                                    (run by the real tool, never written by hand)
    assistant  The answer is 1817517.

and a task without one (`sort`, `reverse`) is answered directly under the same system turn, so the
model learns when to call, not only how. SFT trains on the assistant turns only (the tool's output
is context). `--direct` writes the same questions answered directly with no tool listing: the
baseline that says what the tool is worth. Questions come from the task's "train" split; the
"eval" split, disjoint by construction, is what benchmarks/agent_tools.py scores.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass

from lmforge.cli_config import add_config_command
from lmforge.config import require

# task -> (tool, how its question becomes the tool's arguments)
_TOOL_FOR = {
    "add": ("calc", lambda q: {"expression": _expr(q)}),
    "mul": ("calc", lambda q: {"expression": _expr(q)}),
    "mul-long": ("calc", lambda q: {"expression": _expr(q)}),
    "convert": ("convert", lambda q: _convert_args(q)),
}


def _expr(question: str) -> str:
    m = re.fullmatch(r"What is (.+)\?", question)
    if not m:
        raise ValueError(f"not an arithmetic question: {question!r}")
    return m.group(1)


def _convert_args(question: str) -> dict:
    m = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question)
    if not m:
        raise ValueError(f"not a conversion question: {question!r}")
    return {"value": int(m.group(2)), "from_unit": m.group(3), "to_unit": m.group(1)}


def trace(task_name: str, question: str, answer: str, tools: dict, direct: bool = False) -> dict:
    """One conversation for `question` (see the module docstring); the tool is run for real and must agree with the
    task's answer."""
    from lmforge.agent.protocol import call_text, tools_system
    from lmforge.align.tasks import answer_text, get_task

    task = get_task(task_name)
    final = {"role": "assistant", "content": answer_text(task, answer)}
    if direct:
        return {"messages": [{"role": "user", "content": question}, final]}
    schemas = [t.schema() for t in tools.values()]
    messages = [{"role": "system", "content": tools_system(schemas)}, {"role": "user", "content": question}]
    if task_name in _TOOL_FOR:
        name, make_args = _TOOL_FOR[task_name]
        args = make_args(question)
        result = tools[name].call(args)
        if not task.equal(task.extract(result), answer):
            raise ValueError(f"{name}{args} gave {result!r}, the task says {answer!r}")
        messages += [{"role": "assistant", "content": call_text(name, args)}, {"role": "tool", "content": result}]
    messages.append(final)
    return {"messages": messages}


@dataclass(frozen=True)
class ToolTracesConfig:
    """`lmforge tool-traces`: SFT conversations that call tools where they help."""

    tasks: str = "mul-long,reverse"  # comma-separated tasks (add, mul, mul-long, convert use a tool; sort, reverse not)
    n: int = 1000  # conversations per task
    out: str = ""  # the JSONL file to write (what lmforge sft --data reads)
    seed: int = 0  # which questions (the task's train split)
    direct: bool = False  # answer directly with no tool listing (the baseline without tools)
    split: str = "train"  # train, or eval (held-out questions, for scoring)

    def validate(self) -> ToolTracesConfig:
        require([(bool(self.out), "needs --out (the JSONL file to write)"), (self.n >= 1, "n must be >= 1"),
                 (self.split in ("train", "eval"), "split must be train or eval")])  # fmt: skip
        return self


def register(subparsers) -> None:
    add_config_command(subparsers, "tool-traces", "tool-use conversations for SFT from the verifiable tasks",
                       ToolTracesConfig, write_traces, description=__doc__)  # fmt: skip


def write_traces(cfg: ToolTracesConfig) -> dict:
    from lmforge.agent.tools import builtin_tools
    from lmforge.align.tasks import get_task, make_split
    from lmforge.fileio import atomic_write_text

    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    tasks = [get_task(t) for t in names]  # unknown names: one line
    tools = builtin_tools(sorted({_TOOL_FOR[t][0] for t in names if t in _TOOL_FOR}) or ["calc"])
    lines, counts = [], {}
    for task in tasks:
        items = make_split(task, cfg.n, seed=cfg.seed, split=cfg.split)
        for q, a in items:
            lines.append(json.dumps(trace(task.name, q, a, tools, cfg.direct), ensure_ascii=False))
        counts[task.name] = len(items)
    random.Random(cfg.seed).shuffle(lines)  # tasks interleaved, so any prefix of the file is a mix
    atomic_write_text(cfg.out, "\n".join(lines) + "\n")
    print(f"lmforge tool-traces: {len(lines)} conversations -> {cfg.out} ({counts})", file=sys.stderr)
    return counts
