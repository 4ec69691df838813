"""Tool-using agents: the exact calculator, the unit converter, typed tools, tool-call parsing, and the loop with a
scripted model (every bad input reported to the model, never fatal): `python -m pytest -q tests/test_agent.py`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from lmforge.agent.calc import CalcError, calculate
from lmforge.agent.loop import Agent, Limits
from lmforge.agent.protocol import parse_tool_calls, tools_system
from lmforge.agent.tools import Tool, ToolError, builtin_tools, convert
from lmforge.cli import main


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("4821 * 377", "1817517"),
        ("(2^10 - 24) / 8", "125"),  # ^ is power, with power's precedence
        ("2^3^2", "512"),
        ("-2**2", "-4"),
        ("1/3 + 0.5", "5/6 (≈ 0.8333333333)"),
        ("0.1 + 0.2", "0.3"),  # exact rationals, not floats
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("1.5e3 × 2 ÷ 4", "750"),
        ("12345678901234567890 * 98765432109876543210", str(12345678901234567890 * 98765432109876543210)),
        ("2 ** -2", "0.25"),
    ],
)
def test_calculator_is_exact(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("__import__('os').system('true')", "not arithmetic: a function call"),
        ("open", "not arithmetic: a name (open)"),
        ("(1).real", "not arithmetic: an attribute"),
        ("'a' * 3", "not arithmetic: a str constant"),
        ("1 < 2", "not arithmetic: a comparison"),
        ("3 & 1", "not arithmetic: the operator BitAnd"),
        ("True + 1", "not arithmetic: a bool constant"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("9**9**9", "exponent 387420489 is larger than 10000"),
        ("999999 ** 9999", "more than 4000 digits"),
        ("9 ** 3000 * 9 ** 3000", "more than 4000 digits"),
        ("2 ** 0.5", "whole number"),
        ("1e999", "out of range"),
        ("1 +", "malformed expression"),
        ("", "empty"),
        ("1+" * 1500 + "1", "longer than 2000 characters"),
        ("(" * 300 + "1" + ")" * 300, "malformed expression"),
    ],
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expr, why):
    t0 = time.perf_counter()
    with pytest.raises(CalcError, match=why.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        calculate(expr)
    assert time.perf_counter() - t0 < 2  # refused quickly, never computed


def test_convert_units_exactly():
    assert convert(3, "miles", "km") == "4.828032 km"
    assert convert(100, "C", "F") == "212 F" and convert(98.6, "fahrenheit", "celsius") == "37 C"
    assert convert(0, "K", "C") == "-273.15 C"
    assert convert(1, "GiB", "MB") == "1073.741824 MB"
    assert convert(90, "minutes", "h") == "1.5 h"
    with pytest.raises(ToolError, match="unknown unit 'parsec'"):
        convert(1, "parsec", "m")
    with pytest.raises(ToolError, match="kg is mass but m is length"):
        convert(1, "kg", "m")
    with pytest.raises(ToolError, match="temperature"):
        convert(1, "C", "m")


def weather(city: str, days: int = 1, metric: bool = True) -> str:
    """Forecast for a city.

    More text the model does not need."""
    return f"{city}: sunny for {days} day(s)"


def test_tool_schema_and_argument_checks():
    tool = Tool.from_function(weather, param_help={"city": "where"})
    fn = tool.schema()["function"]
    assert fn["name"] == "weather" and fn["description"] == "Forecast for a city."
    assert fn["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "where"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}  # fmt: skip
    assert tool.call({"city": "Oslo", "days": 2}) == "Oslo: sunny for 2 day(s)"
    for args, why in [({}, "missing required argument"), ({"city": "x", "when": 1}, "unknown argument"),
                      ({"city": 3}, "city must be string, got number"), ({"city": "x", "days": True}, "integer"),
                      ({"city": "x", "days": 1.5}, "integer"), ([], "must be a JSON object")]:  # fmt: skip
        with pytest.raises(ToolError, match=why):
            tool.call(args)
    assert builtin_tools(["convert"])["convert"].call({"value": 2, "from_unit": "kg", "to_unit": "g"}) == "2000 g"
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="unknown tool 'shell'"):
        builtin_tools(["shell"])
    with pytest.raises(LmforgeError, match="needs a retrieval index"):
        builtin_tools(["search"])


def test_parse_tool_calls():
    text = ('I will compute.\n<tool_call>\n{"name": "calc", "arguments": {"expression": "2*3"}}\n</tool_call>\n'
            '<tool_call>{"name": "convert", "arguments": "{\\"value\\": 1, \\"from_unit\\": \\"km\\", '
            '\\"to_unit\\": \\"m\\"}"}</tool_call><tool_call>{"name": "calc", "arguments": {oops}}</tool_call>'
            '<tool_call>["calc"]</tool_call><tool_call>{"name": "calc", "arguments": {"expression": "1"}}')  # fmt: skip
    calls, errors = parse_tool_calls(text)
    assert calls == [{"name": "calc", "arguments": {"expression": "2*3"}},
                     {"name": "convert", "arguments": {"value": 1, "from_unit": "km", "to_unit": "m"}},
                     {"name": "calc", "arguments": {"expression": "1"}}]  # fmt: skip
    assert len(errors) == 2 and "not JSON" in errors[0] and 'want {"name"' in errors[1]
    assert parse_tool_calls("The answer is 6.") == ([], [])


def scripted(*turns):
    """A model that says `turns` in order and records the conversations it was shown."""
    seen = []

    def gen(messages, tools=None):
        seen.append([dict(m) for m in messages])
        return turns[len(seen) - 1]

    gen.seen = seen
    return gen


def call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_agent_calls_the_calculator_and_answers():
    model = scripted(call("calc", expression="4821 * 377"), "4821 * 377 = 1817517.")
    result = Agent(model, builtin_tools(["calc"])).run("What is 4821 * 377?")
    assert result.answer == "4821 * 377 = 1817517." and result.stopped == "answer"
    assert [(s["name"], s["result"]) for s in result.steps] == [("calc", "1817517")]
    first, second = model.seen
    assert first[0]["role"] == "system" and '"name": "calc"' in first[0]["content"] and "<tools>" in first[0]["content"]
    assert second[-1] == {"role": "tool", "content": "1817517"}


def loops_forever(n: int) -> str:
    """Never returns."""
    while True:
        n += 1


def explodes(n: int) -> str:
    """Raises."""
    raise RuntimeError(f"boom {n}")


def chatty(n: int) -> str:
    """Says too much."""
    return "x" * 10_000


def test_agent_reports_every_failure_to_the_model_and_goes_on():
    tools = builtin_tools(["calc"]) | {f.__name__: Tool.from_function(f) for f in (loops_forever, explodes, chatty)}
    turns = [
        "<tool_call>{not json}</tool_call>",
        call("shell", cmd="rm -rf /"),
        call("calc", expression="__import__('os')"),
        call("calc", expr="1"),
        call("explodes", n=1),
        call("loops_forever", n=0),
        call("chatty", n=1),
        "done",
    ]
    model = scripted(*turns)
    limits = Limits(max_steps=10, tool_timeout_s=0.5, max_output_chars=100)
    t0 = time.perf_counter()
    result = Agent(model, tools, limits=limits).run("try everything")
    assert time.perf_counter() - t0 < 10  # the looping tool was stopped
    assert result.answer == "done" and result.stopped == "answer"
    tool_turns = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert tool_turns[0].startswith("error: malformed tool call (not JSON")
    assert tool_turns[1] == "error: unknown tool 'shell'; the tools are ['calc', 'chatty', 'explodes', 'loops_forever']"
    assert tool_turns[2] == "error: calc: not arithmetic: a function call"
    assert tool_turns[3] == "error: calc: unknown argument(s) ['expr']; it takes ['expression']"
    assert tool_turns[4] == "error: explodes raised RuntimeError: boom 1"
    assert tool_turns[5] == "error: loops_forever timed out after 0.5 s and was stopped"
    assert tool_turns[6] == "x" * 100 + "\n[cut: 9900 more characters]"


def test_agent_limits_steps_and_calls_per_turn():
    model = scripted(*[call("calc", expression="1+1")] * 3)
    result = Agent(model, builtin_tools(["calc"]), limits=Limits(max_steps=3)).run("loop")
    assert result.stopped == "max_steps" and result.answer == "" and len(result.steps) == 3
    model = scripted(call("calc", expression="1") * 3, "ok")
    result = Agent(model, builtin_tools(["calc"]), limits=Limits(max_calls_per_step=2)).run("many")
    assert [s.get("error", "")[:9] for s in result.steps] == ["", "", "more than"]


def test_agent_with_a_template_that_renders_tools_or_refuses_the_tool_role(tmp_path, small_shards):
    import shutil

    from lmforge.chat.template import ChatFormat

    tok = tmp_path / "tok"
    shutil.copytree(small_shards.parent / "tok", tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool_call role') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    fmt = ChatFormat(tok)
    shown = []
    model = scripted(call("calc", expression="6*7"), "42")
    agent = Agent(lambda m, tools: shown.append(tools) or model(m, tools), builtin_tools(["calc"]), fmt=fmt)
    result = agent.run("6*7?")
    assert agent.template_tools and shown[0][0]["function"]["name"] == "calc"  # the template lists the tools
    assert result.messages[0]["role"] == "user"  # so no system text of ours
    assert result.messages[2] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    assert "TOOLS:calc;" in fmt.render(result.messages, tools=shown[0])
    assert "tools" in tools_system([builtin_tools(["calc"])["calc"].schema()])


def test_agent_cli(chat_model, capsys):
    run = chat_model
    assert main(["agent", str(run), "--tools", "calc,convert", "What is 2 * 21?", "--max-new-tokens", "8",
                 "--max-steps", "2", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["stopped"] in ("answer", "max_steps") and out["messages"][1]["content"] == "What is 2 * 21?"
    assert main(["agent", str(run), "--tools", "calc,shell", "x"]) == 2
    assert "unknown tool 'shell'" in capsys.readouterr().err
    assert main(["agent", str(run), "--tools", "search", "x"]) == 2
    assert "needs a retrieval index" in capsys.readouterr().err


def test_server_renders_tool_turns_and_returns_tool_calls(chat_model):
    from lmforge.agent.protocol import chat_messages, split_tool_calls
    from lmforge.serve.api import create_app, load_served
    from lmforge.serve.openai_schema import ChatRequest
    from tests.serve_helpers import ServerThread

    rest, calls = split_tool_calls(
        'Let me see. <tool_call>{"name": "calc", "arguments": {"expression": "6*7"}}</tool_call>'
    )
    assert rest == "Let me see." and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "calc", "arguments": '{"expression": "6*7"}'}
    assert split_tool_calls("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])

    served = load_served(str(chat_model), name="tiny", device="cpu", max_batch=2, max_context=None, prefill_chunk=64,
                         max_queue=8, api_key=None, max_body=1 << 20)  # fmt: skip
    tools = [builtin_tools(["calc"])["calc"].schema()]
    history = [
        {"role": "user", "content": "6*7?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "6*7"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]  # fmt: skip
    req = ChatRequest.model_validate({"model": "tiny", "messages": history, "tools": tools})
    rendered = chat_messages(req.messages, served.chat, tools)
    assert rendered[0]["role"] == "system" and '"name": "calc"' in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "calc", "arguments": '
                           '{"expression": "6*7"}}\n</tool_call>'}  # fmt: skip
    assert rendered[3] == {"role": "tool", "content": "42"}

    body = {"model": "tiny", "messages": history, "tools": tools, "max_tokens": 4, "temperature": 0}  # greedy: the
    # streamed and whole replies below must end the same way
    with ServerThread(create_app(served)) as url:

        def post(payload):
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, text = post(body)
        whole = json.loads(text)
        choice = whole["choices"][0]
        assert status == 200 and choice["finish_reason"] in ("stop", "length", "tool_calls")
        status, text = post({**body, "tools": None})
        assert whole["usage"]["prompt_tokens"] > json.loads(text)["usage"]["prompt_tokens"] + 50  # the listing
        status, text = post({**body, "tool_choice": "none"})
        assert json.loads(text)["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"]
        status, text = post({**body, "stream": True, "stream_options": {"include_usage": True}})
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1]["usage"]["completion_tokens"] >= 1
        assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
        for bad, param in [({"tool_choice": "required"}, "tool_choice"),
                           ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
                           ({"tools": [{"type": "retrieval"}]}, "tools.0.type")]:  # fmt: skip
            status, text = post({**body, **bad})
            assert status == 400 and json.loads(text)["error"]["param"] == param
        bad_args = json.loads(json.dumps(history))
        bad_args[1]["tool_calls"][0]["function"]["arguments"] = "{nope"
        status, text = post({**body, "messages": bad_args})
        assert status == 400 and "arguments are not JSON" in json.loads(text)["error"]["message"]
