"""The tool-call wire format in a chat (ChatML/Qwen/Hermes), shared by the agent loop, tool traces and the server.

    from lmforge.agent.protocol import tools_system, call_text, parse_tool_calls, tool_turn, renders_tools
    tools_system([schema, ...])                  # the system text listing the tools inside <tools></tools>
    call_text("calc", {"expression": "6*7"})     # '<tool_call>\\n{"name": "calc", ...}\\n</tool_call>'
    parse_tool_calls(reply)                      # ([{"name", "arguments"}], [error messages for malformed calls])
    tool_turn(fmt, "42")                         # {"role": "tool", ...}, or a user turn with <tool_response>

The system turn lists the tools as JSON schemas inside `<tools></tools>`; the model writes each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; each result comes back in a `tool` turn, or, for a
chat template that refuses that role, in a user turn holding `<tool_response>...</tool_response>`. A template
that renders `tools` itself (Qwen2.5's) gets the schemas as its `tools` variable instead of the system text.
`chat_messages` and `split_tool_calls` translate between this and the OpenAI API's `tool_calls` (lmforge serve).
"""

from __future__ import annotations

import json
import re
import uuid

from lmforge.errors import LmforgeError

TOOLS_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""  # Qwen2.5's wording, which instruction-tuned models with tool use were trained on

CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def tools_system(schemas: list[dict], system: str = "") -> str:
    """The system text: `system` (if any), then the tool listing."""
    text = TOOLS_SYSTEM.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in schemas))
    return f"{system}\n\n{text}" if system else text


def call_text(name: str, arguments: dict) -> str:
    """One call as the model writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def parse_tool_calls(text: str) -> tuple[list[dict], list[str]]:
    """(calls, errors) in a model turn: each call {"name", "arguments"}; each malformed one an error message."""
    calls, errors = [], []
    for m in CALL.finditer(text):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"malformed tool call (not JSON: {e.msg} at character {e.pos}): {body[:200]}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f'malformed tool call (want {{"name": ..., "arguments": {{...}}}}): {body[:200]}')
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # OpenAI's wire format sends arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                errors.append(f"malformed arguments for {obj['name']} (not JSON: {e.msg})")
                continue
        calls.append({"name": obj["name"], "arguments": args})
    return calls, errors


def renders_tools(fmt) -> bool:
    """The chat template lists the tools itself (Qwen2.5's `tools` variable); else they go into the system turn."""
    return fmt is not None and "tools" in (fmt.template or "") and "tool_call" in fmt.template


def accepts_tool_role(fmt) -> bool:
    """Whether the chat template renders a `tool` turn (some raise on any role but system/user/assistant)."""
    if fmt is None:
        return True
    try:
        fmt.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                    {"role": "tool", "content": "z"}])  # fmt: skip
    except LmforgeError:
        return False
    return True


def tool_turn(text: str, tool_role: bool = True) -> dict:
    """A tool's result as a turn: role "tool", or (`tool_role` False) a user turn holding <tool_response>."""
    if tool_role:
        return {"role": "tool", "content": text}
    return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}


def chat_messages(messages, fmt, tools: list[dict]) -> list[dict]:
    """OpenAI request messages (lmforge.serve.openai_schema.Message) as the template renders them: an assistant
    turn's `tool_calls` written back as the model writes them, tool turns as `tool_turn` gives them, and with
    `tools` the listing in the system turn unless the template renders them."""
    out = []
    for m in messages:
        role, text = ("system" if m.role == "developer" else m.role), m.text()
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError:
                    raise LmforgeError(f"tool call {c.id}: arguments are not JSON") from None
                calls.append(call_text(c.function.name, args))
            text = "\n".join(([text] if text else []) + calls)
        out.append({"role": role, "content": text})
    if any(m["role"] == "tool" for m in out) and not accepts_tool_role(fmt):
        out = [tool_turn(m["content"], False) if m["role"] == "tool" else m for m in out]
    if tools and not renders_tools(fmt):
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": tools_system(tools, out[0]["content"])}
        else:
            out.insert(0, {"role": "system", "content": tools_system(tools)})
    return out


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside the calls, OpenAI `tool_calls`) of a reply; malformed calls stay in the text."""
    calls, _ = parse_tool_calls(text)
    if not calls:
        return text, []
    rest = CALL.sub("", text).strip()
    out = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
           for c in calls]  # fmt: skip
    return rest, out
