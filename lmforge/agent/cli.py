"""`lmforge agent`: a chat model that calls tools (calculator, unit converter, document search) to answer.

    lmforge agent models/smollm2 --tools calc,convert "What is 4821 * 377?"
    lmforge agent runs/tools-sft --tools calc "What is 93817 * 4402?" --json      # the whole trace as JSON
    lmforge agent models/smollm2 --tools search --rag runs/pydoc-index "What does a failing assert raise?"

Each model turn either calls tools (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the
ChatML/Qwen convention) or answers. Tool calls and their results are printed on stderr as they happen,
the answer on stdout. Malformed calls, unknown tools, bad arguments and tools that fail or run too long
are reported to the model, which gets another turn, up to --max-steps (lmforge/agent/loop.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from lmforge.cli_config import add_config_command
from lmforge.config import require


@dataclass(frozen=True)
class AgentConfig:
    """`lmforge agent`: each field's comment is its help text."""

    model: str = ""  # the chat model (a run, checkpoint or imported folder)
    question: str = ""  # what to ask
    tools: str = "calc,convert"  # comma-separated built-in tools: calc, convert, search (needs --rag)
    rag: str = ""  # a retrieval index (lmforge rag index) for the search tool
    system: str = ""  # a system prompt before the tool listing
    max_steps: int = 5  # model turns in all
    tool_timeout: float = 10.0  # seconds per tool call
    max_output_chars: int = 2000  # a tool result is cut beyond this
    max_new_tokens: int = 256  # most tokens per model turn
    temperature: float = 0.0  # 0 = greedy
    json: bool = False  # print the whole trace as JSON
    device: str = "auto"

    def validate(self) -> AgentConfig:
        require([(bool(self.model), "needs a model: lmforge agent MODEL QUESTION"),
                 (bool(self.question.strip()), "needs a question"),
                 (self.max_steps >= 1, "max_steps must be at least 1"),
                 (self.tool_timeout > 0, "tool_timeout must be > 0"),
                 (self.max_output_chars >= 100, "max_output_chars must be at least 100"),
                 (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
                 (self.temperature >= 0, "temperature must be >= 0")])  # fmt: skip
        return self


def register(subparsers) -> None:
    add_config_command(subparsers, "agent", "answer with tools (calculator, unit converter, document search)",
                       AgentConfig, agent, description=__doc__, positional=("model", "question"))  # fmt: skip


def agent(cfg: AgentConfig) -> dict:
    from lmforge.agent.loop import Agent, Limits, model_generator
    from lmforge.agent.tools import builtin_tools
    from lmforge.chat.template import ChatFormat
    from lmforge.errors import LmforgeError
    from lmforge.train.checkpoint import load_for_inference
    from lmforge.train.common import pick_device

    names = [t.strip() for t in cfg.tools.split(",") if t.strip()]
    index = None
    if cfg.rag:
        from lmforge.rag.index import RagIndex

        index = RagIndex.load(cfg.rag)
    tools = builtin_tools(names, index=index)
    model, tok_dir, _ = load_for_inference(cfg.model, device=pick_device(cfg.device))
    if cfg.max_new_tokens >= model.cfg.max_seq_len:
        raise LmforgeError(f"max_new_tokens ({cfg.max_new_tokens}) must be below the model's context "
                           f"({model.cfg.max_seq_len})")  # fmt: skip
    fmt = ChatFormat(tok_dir)
    limits = Limits(max_steps=cfg.max_steps, tool_timeout_s=cfg.tool_timeout, max_output_chars=cfg.max_output_chars)
    loop = Agent(model_generator(model, fmt, cfg.max_new_tokens, cfg.temperature), tools, fmt, limits, cfg.system)
    result = loop.run(cfg.question)
    if cfg.json:
        print(json.dumps({"answer": result.answer, "stopped": result.stopped, "steps": result.steps,
                          "messages": result.messages}, ensure_ascii=False, indent=1))  # fmt: skip
    else:
        for step in result.steps:
            outcome = step.get("result", f"error: {step.get('error')}")
            print(f"lmforge agent: {step['name']}({json.dumps(step['arguments'], ensure_ascii=False)}) -> {outcome}",
                  file=sys.stderr)  # fmt: skip
        if result.stopped != "answer":
            print(f"lmforge agent: stopped at {result.stopped} without an answer", file=sys.stderr)
        print(result.answer)
    return {"answer": result.answer, "stopped": result.stopped, "steps": result.steps}
