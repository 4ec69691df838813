"""`lmforge chat --url`: the terminal chat against a running server's /v1/chat/completions (streamed).

    lmforge serve runs/demo/sft &                 # in one terminal
    lmforge chat --url http://127.0.0.1:8000      # in another

Standard library only (urllib): any OpenAI-compatible server works, not just `lmforge serve`.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from lmforge.errors import LmforgeError


class RemoteSession:
    """The same interface as chat_cmd.ChatSession (`reply`, `reset`, `max_new`), answered by a server."""

    def __init__(self, url: str, model: str | None, api_key: str | None, system: str | None, **sampling):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.key = api_key or os.environ.get("LMFORGE_API_KEY")
        self.system, self.sampling = system, sampling
        self.max_new = sampling["max_tokens"]
        self.model = model or self._first_model()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def printer(self):
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        return write

    def _open(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        try:
            return urllib.request.urlopen(urllib.request.Request(self.base + path, data=data, headers=headers),
                                          timeout=600)  # fmt: skip
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                err = {"message": e.reason, "code": None}
            raise _ServerError(e.code, err.get("message", ""), err.get("code")) from None
        except (urllib.error.URLError, OSError) as e:
            raise LmforgeError(f"{self.base}: cannot reach the server ({getattr(e, 'reason', e)})") from None

    def _first_model(self) -> str:
        try:
            with self._open("/v1/models") as r:
                return json.loads(r.read())["data"][0]["id"]
        except _ServerError as e:
            raise LmforgeError(f"{self.base}/v1/models: {e.status} {e.message}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise LmforgeError(f"{self.base}/v1/models: not an OpenAI-compatible model list") from None

    def reply(self, text: str, stream=None) -> tuple[str, bool]:
        """(answer, ended before max_tokens); the answer is streamed to `stream(text)` as it comes."""
        self.messages.append({"role": "user", "content": text})
        s = self.sampling
        body = {"model": self.model, "stream": True, "temperature": s["temperature"], "top_p": s["top_p"],
                "seed": s["seed"]}  # fmt: skip
        if s["max_tokens"]:
            body["max_tokens"] = s["max_tokens"]
        if s.get("top_k"):
            body["top_k"] = s["top_k"]
        if s.get("repetition_penalty", 1.0) != 1.0:
            body["repetition_penalty"] = s["repetition_penalty"]
        first = 1 if self.system else 0
        while True:
            try:
                response = self._open("/v1/chat/completions", {**body, "messages": self.messages})
                break
            except _ServerError as e:
                if e.code == "context_length_exceeded" and len(self.messages) - first > 1:
                    del self.messages[first : first + 2]
                    print("lmforge chat: history too long for the context; dropped the oldest exchange",
                          file=sys.stderr)  # fmt: skip
                    continue
                self.messages.pop()
                raise LmforgeError(f"the server answered {e.status}: {e.message}") from None
        answer, finish, sources = [], None, []
        with response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise LmforgeError(f"the server failed mid-reply: {event['error'].get('message')}")
                sources += event.get("sources") or []  # a `serve --rag` server's passages, in the first chunk
                for choice in event.get("choices", []):
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta:
                        answer.append(delta)
                        if stream is not None:
                            stream(delta)
                    finish = choice.get("finish_reason") or finish
        text = "".join(answer)
        self.messages.append({"role": "assistant", "content": text})
        if sources:
            listing = "; ".join(f"[{s.get('index')}] {s.get('source')}" for s in sources)
            print(f"\nlmforge chat: sources {listing}", file=sys.stderr)
        return text, finish != "length"


class _ServerError(Exception):
    def __init__(self, status: int, message: str, code: str | None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
