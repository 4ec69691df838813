"""The OpenAI API's request bodies, validated, and its error shape: what `lmforge serve` accepts and answers.

    body = parse(ChatRequest, raw_bytes)          # raises ApiError(400, ...) naming the bad parameter

Every error the server returns is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status,
as the OpenAI API shapes them (never FastAPI's 422 body). Unknown parameters are refused by name (400),
except a few that change nothing here (`user`, `metadata`, `store`, ...), so a client never believes a
setting took effect when it did not. `top_k` and `repetition_penalty` are accepted as vLLM does.

    python -m pytest -q tests/test_serve_api.py
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none)$|\[|^function-")
# Parameters a client may send that have no effect on a local model's output.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}


class ApiError(Exception):
    """An error answered in the OpenAI shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Parameters both endpoints take."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=16)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as the API sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: which call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # functions the model may call (the ChatML/Qwen <tool_call> convention, lmforge/agent/loop.py); "auto" lets it
    # choose, "none" hides the tools
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none"] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)


def parse(kind: type[_Common], raw: bytes) -> _Common:
    """A validated request from the raw body; ApiError(400) naming the parameter when it is not one."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        req = kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # A union's member shows in the path (prompt.list[int].0): the client named `prompt`, not a type.
        param = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and _TYPE_TAG.search(p))) or None
        msg = err["msg"] if err["type"] != "missing" else "this parameter is required"
        raise ApiError(400, f"{param}: {msg}", param=param, code="invalid_value" if err["type"] != "missing"
                       else "missing_required_parameter") from None  # fmt: skip
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED or value in (None, [], {}) or (name == "response_format" and value == {"type": "text"}):
            continue
        raise ApiError(400, f"unsupported parameter: {name}", param=name, code="unsupported_parameter")
    for m in getattr(req, "messages", []):
        for name in m.model_extra or {}:
            if m.model_extra[name] not in (None, [], {}):
                raise ApiError(400, f"unsupported message field: {name}", param=f"messages.{name}",
                               code="unsupported_parameter")  # fmt: skip
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo",
                           code="unsupported_parameter")  # fmt: skip
    return req


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
