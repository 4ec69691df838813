"""The tool-calling loop: the model asks for tools in its chat format, the loop runs them with limits and feeds
the results back until the model answers.

    from lmforge.agent.loop import Agent, Limits, model_generator
    from lmforge.agent.tools import builtin_tools
    agent = Agent(model_generator(model, fmt), builtin_tools(["calc"]), fmt=fmt, limits=Limits(max_steps=4))
    result = agent.run("What is 4821 * 377?")
    result.answer, result.steps          # "1817517", [{"name": "calc", "arguments": {...}, "result": "1817517"}]

The protocol is ChatML/Qwen/Hermes's (lmforge/agent/protocol.py): the system turn lists the tools as JSON
schemas inside `<tools></tools>`, the model writes each call as `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, and each result comes back in a `tool` turn (or a user turn holding `<tool_response>` for a
template that refuses that role).

Nothing the model writes can stop the loop or escape it: malformed JSON in a call, an unknown tool,
bad arguments, a tool that raises, one that runs past `tool_timeout_s` (an isolated tool runs in a
forked process that is killed; the built-in tools are bounded by construction and run in-process)
or prints more than `max_output_chars` (cut, and said so): each becomes an error message in the
tool turn and the model gets another step. The loop ends at the first turn without a tool call
(the answer), or after `max_steps` model turns, or when `max_seconds` have passed.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.agent.protocol import accepts_tool_role, parse_tool_calls, renders_tools, tool_turn, tools_system
from lmforge.agent.tools import Tool, ToolError


@dataclass
class Limits:
    max_steps: int = 5  # model turns in all (each may call tools)
    max_calls_per_step: int = 4  # tool calls run per turn (more are refused)
    tool_timeout_s: float = 10.0  # per call
    max_output_chars: int = 2000  # a tool's result is cut beyond this
    max_seconds: float = 300.0  # the whole run


@dataclass
class AgentResult:
    answer: str
    messages: list[dict]
    steps: list[dict] = field(default_factory=list)  # one per tool call: name, arguments, result or error, seconds
    stopped: str = "answer"  # answer | max_steps | max_seconds


def _child(tool: Tool, arguments, conn) -> None:
    try:
        conn.send(("ok", tool.call(arguments)))
    except ToolError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - a tool's own failure is reported to the model
        conn.send(("error", f"{tool.name} raised {type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_tool(tool: Tool, arguments, timeout_s: float) -> tuple[str, str]:
    """("ok", result) or ("error", message): a raising tool is an error; an isolated tool past `timeout_s` is
    killed (forked process) and reported as timed out."""
    if not tool.isolated or "fork" not in multiprocessing.get_all_start_methods():
        try:
            return "ok", tool.call(arguments)
        except ToolError as e:
            return "error", str(e)
        except Exception as e:  # noqa: BLE001
            return "error", f"{tool.name} raised {type(e).__name__}: {e}"
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(tool, arguments, child), daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            try:
                return parent.recv()
            except EOFError:
                return "error", f"{tool.name} exited without a result"
        return "error", f"{tool.name} timed out after {timeout_s:g} s and was stopped"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()


class Agent:
    """`run(question)`: the loop (see the module docstring). `generate(messages, tools) -> str` is the model: a
    real one from `model_generator`, or a scripted one in tests."""

    def __init__(self, generate: Callable, tools: dict[str, Tool], fmt=None, limits: Limits | None = None,
                 system: str = ""):  # fmt: skip
        self.generate, self.tools, self.limits = generate, tools, limits or Limits()
        self.schemas = [t.schema() for t in tools.values()]
        self.template_tools = renders_tools(fmt)
        self.system = system if self.template_tools else tools_system(self.schemas, system)
        self.tool_role = accepts_tool_role(fmt)

    def run(self, question: str) -> AgentResult:
        lim = self.limits
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": question}
        ]
        result = AgentResult("", messages)
        start = time.perf_counter()
        for _ in range(lim.max_steps):
            if time.perf_counter() - start > lim.max_seconds:
                result.stopped = "max_seconds"
                return result
            reply = self.generate(messages, self.schemas if self.template_tools else None)
            messages.append({"role": "assistant", "content": reply})
            calls, errors = parse_tool_calls(reply)
            if not calls and not errors:
                result.answer = reply.strip()
                return result
            outputs = [f"error: {e}" for e in errors]
            for i, call in enumerate(calls):
                t0 = time.perf_counter()
                step = {"name": call["name"], "arguments": call["arguments"]}
                if i >= lim.max_calls_per_step:
                    status, text = "error", f"more than {lim.max_calls_per_step} tool calls in one turn; not run"
                elif call["name"] not in self.tools:
                    status, text = "error", f"unknown tool {call['name']!r}; the tools are {sorted(self.tools)}"
                else:
                    status, text = run_tool(self.tools[call["name"]], call["arguments"], lim.tool_timeout_s)
                if len(text) > lim.max_output_chars:
                    text = text[: lim.max_output_chars] + f"\n[cut: {len(text) - lim.max_output_chars} more characters]"
                step["result" if status == "ok" else "error"] = text
                step["seconds"] = round(time.perf_counter() - t0, 4)
                result.steps.append(step)
                outputs.append(text if status == "ok" else f"error: {text}")
            for out in outputs:
                messages.append(tool_turn(out, self.tool_role))
        result.stopped = "max_steps"
        return result


def model_generator(model, fmt, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> Callable:
    """generate(messages, tools) -> the model's next turn as text, for `Agent` (greedy by default). The prompt
    keeps its end when it outgrows the context."""
    from lmforge.serve.generate import generate

    def gen(messages, tools=None):
        ids = fmt.encode(messages, add_generation_prompt=True, tools=tools)
        budget = model.cfg.max_seq_len - max_new_tokens
        out = generate(model, [ids[-budget:]], max_new_tokens, stop_ids=fmt.stop_ids, temperature=temperature,
                       seed=seed)[0]  # fmt: skip
        return fmt.tokenizer.decode(out)

    return gen
