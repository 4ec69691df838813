"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI); `lmforge serve` runs it.

    app = create_app(load_served("runs/demo/sft", name="demo", ..., engine="process"))   # then: uvicorn.run(app)

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream`), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text) and `GET /` (the chat page, lmforge/serve/static/).
Each request becomes one engine request per choice (`n`); the engine (in a child process,
engine_process.py, or a thread of this one) hands tokens to the request's asyncio queue, and a
`TextStream` per choice turns them into text and watches the stop strings (where the tokens arrive,
so a stop string ends the request at once). A client that goes away (a closed stream, or a dropped
connection while waiting for a whole answer) cancels its requests.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.agent.protocol import chat_messages, renders_tools, split_tool_calls
from lmforge.errors import LmforgeError
from lmforge.serve.engine import Engine, QueueFull, Sampling
from lmforge.serve.engine import Request as EngineRequest
from lmforge.serve.engine_process import EngineProcess
from lmforge.serve.event_stream import DONE, EventStream
from lmforge.serve.metrics import Metrics
from lmforge.serve.openai_schema import ApiError, ChatRequest, CompletionRequest, parse
from lmforge.serve.text_stream import TextStream, token_bytes


@dataclass
class Served:
    """What the app serves: the engine, its tokenizer and chat format, the name clients use, the limits."""

    engine: Engine | EngineProcess
    tokenizer: object
    chat: object | None  # ChatFormat, or None for a model without a chat template (completions only)
    name: str
    api_key: str | None = None
    max_body: int = 1 << 20
    eos_ids: list[int] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    rag: object | None = None  # a RagIndex: each chat request's last user turn gets its top `rag_k` passages
    rag_k: int = 4
    info: dict = field(default_factory=dict)  # the engine's: KV-cache MiB, threads, parameters (engine_process.py)


class Dispatcher:
    """Hands the engine thread's events to the asyncio loop with one wake-up per burst, not one per token.

    `post(queue, item)` may be called from any thread; the items reach their queues in order. With 64 streams,
    a wake-up per token (a write to the loop's self-pipe and a callback each) cost more than the decode step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.scheduled = loop, [], False
        self.loop_thread = threading.get_ident()

    def post(self, queue: asyncio.Queue, item) -> None:
        self.pending.append((queue, item))  # list.append is atomic under the GIL
        if not self.scheduled:
            self.scheduled = True
            if threading.get_ident() == self.loop_thread:  # an engine in another process: its events come in here
                self.loop.call_soon(self._drain)
            else:
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.scheduled = False  # before the swap: an item appended after it schedules another drain
        items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)


def create_app(served: Served) -> FastAPI:
    engine = served.engine
    metrics = Metrics(engine)
    engine.on_step = metrics.on_step

    async def lifespan(app):
        app.state.dispatcher = Dispatcher(asyncio.get_running_loop())
        if engine.thread is None:
            engine.start()
        # What exists now (torch, FastAPI, the tokenizer: ~10^6 objects) lives as long as the server: out of the
        # collector's sight, or each full collection walks it all (125-170 ms stalls at 64 clients, every few
        # seconds: the p99 time to first token). transformers serve does the same.
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()
        engine.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.metrics = served, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        metrics.request_done(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        err = ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # a bug: answered, logged by uvicorn, the server goes on
        metrics.request_done(request.url.path, 500)
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: Request) -> None:
        if served.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), served.api_key.encode()):  # constant time: no key by timing
            raise ApiError(401, "invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > served.max_body:
            raise ApiError(413, f"the body is {int(size)} bytes, over the limit of {served.max_body}",
                           code="body_too_large")  # fmt: skip
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > served.max_body:
                raise ApiError(413, f"the body is over the limit of {served.max_body} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("lmforge.serve").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise ApiError(503, f"the engine stopped: {engine.error}", type="server_error", code="engine_failed")
        return {"status": "ok", "model": served.name, **engine.load()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "lmforge",
                "max_model_len": engine.max_context}  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse(ChatRequest, await body(request))
        check_model(req.model)
        if served.chat is None:
            raise ApiError(400, f"'{served.name}' has no chat template: use /v1/completions", param="messages",
                           code="no_chat_template")  # fmt: skip
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        max_tokens = req.max_completion_tokens or req.max_tokens
        extra = None
        try:
            messages = chat_messages(req.messages, served.chat, tools)
            if served.rag is not None and messages and messages[-1]["role"] == "user":
                messages, extra = await asyncio.to_thread(with_retrieval, served, messages, max_tokens)
            template_tools = tools if tools and renders_tools(served.chat) else None
            prompt = served.chat.encode(messages, add_generation_prompt=True, tools=template_tools)
        except LmforgeError as e:
            raise ApiError(400, str(e), param="messages") from None
        k = (req.top_logprobs or 0) if req.logprobs else None
        job = Job(served, metrics, "/v1/chat/completions", request, [prompt], req, max_tokens, k, served.chat.stop_ids,
                  extra=extra, tool_calls=bool(tools))  # fmt: skip
        return await job.respond(chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse(CompletionRequest, await body(request))
        check_model(req.model)
        prompts = completion_prompts(req.prompt, served)
        job = Job(served, metrics, "/v1/completions", request, prompts, req, req.max_tokens or 16, req.logprobs,
                  served.eos_ids)  # fmt: skip
        return await job.respond(chat=False)

    def check_model(name: str) -> None:
        if name != served.name:
            raise ApiError(404, f"model '{name}' does not exist (this server has '{served.name}')", param="model",
                           code="model_not_found")  # fmt: skip

    return app


def with_retrieval(served: Served, messages: list[dict], max_tokens: int | None) -> tuple[list[dict], dict]:
    """`--rag`: the last user turn with the index's top passages for it (as many as fit the context), and the
    response's extra field {"sources": [...]}, numbered as the prompt numbers them (lmforge/rag/prompt.py)."""
    from lmforge.rag.prompt import fit_sources

    question = messages[-1]["content"]
    hits = served.rag.search(question, served.rag_k)
    budget = served.engine.max_context - (max_tokens or 1)
    messages, used = fit_sources(served.chat, messages[:-1], question, hits, budget)
    sources = [{"index": i, "source": h.source, "heading": h.heading, "text": h.text} for i, h in enumerate(used, 1)]
    return messages, {"sources": sources}


def completion_prompts(prompt, served: Served) -> list[list[int]]:
    """The prompt(s) of /v1/completions as token ids: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = served.tokenizer.encode(p, add_special_tokens=False).ids if isinstance(p, str) else list(p)
        if not ids:  # an empty prompt starts from the end-of-text token, as an unconditional sample does
            ids = served.eos_ids[:1]
        if not ids:
            raise ApiError(400, "prompt is empty and the tokenizer has no end-of-text token to start from",
                           param="prompt")  # fmt: skip
        out.append(ids)
    if len(out) > 64:
        raise ApiError(400, f"at most 64 prompts per request, got {len(out)}", param="prompt")
    return out


def _ignore_event(token, lp, finish) -> None:
    """A finished job's engine requests' callback (an engine may still report a cancelled one)."""


class Job:
    """One HTTP request: its engine requests (prompts x n choices), their events, and the response."""

    def __init__(self, served: Served, metrics: Metrics, endpoint: str, request: Request, prompts: list[list[int]],
                 req, max_tokens: int | None, logprobs: int | None, stop_ids: list[int],
                 extra: dict | None = None, tool_calls: bool = False):  # fmt: skip
        """`extra`: fields added to the response (the first chunk when streaming): --rag's sources. `tool_calls`:
        the request offered tools, so a reply's `<tool_call>`s come back as OpenAI `tool_calls`."""
        engine = served.engine
        self.extra = extra or {}
        self.tool_calls = tool_calls
        self.served, self.metrics, self.endpoint, self.http, self.req = served, metrics, endpoint, request, req
        self.id = ("chatcmpl-" if endpoint.endswith("chat/completions") else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompts = prompts
        self.dispatcher: Dispatcher = request.app.state.dispatcher
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.engine_reqs: list[EngineRequest] = []
        self.streams: list[TextStream] = []
        self.logprobs = logprobs
        self.gone = False  # the client disconnected mid-stream
        for p, prompt in enumerate(prompts):
            room = engine.max_context - len(prompt)
            if room < 1:
                raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {engine.max_context}",
                               param="messages" if endpoint.endswith("chat/completions") else "prompt",
                               code="context_length_exceeded")  # fmt: skip
            want = max_tokens if max_tokens is not None else room
            if want > room:
                raise ApiError(400, f"max_tokens ({want}) + the prompt ({len(prompt)} tokens) exceeds this model's "
                               f"context of {engine.max_context} tokens", param="max_tokens",
                               code="context_length_exceeded")  # fmt: skip
            for c in range(req.n):
                index = p * req.n + c
                seed = None if req.seed is None else req.seed + c
                sampling = Sampling(max_tokens=want, temperature=req.temperature, top_p=req.top_p,
                                    top_k=max(req.top_k, 0), seed=seed, presence_penalty=req.presence_penalty,
                                    frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                                    stop_ids=tuple(stop_ids), logprobs=logprobs)  # fmt: skip
                stream = TextStream(served.tokenizer, req.stop_list())
                self.streams.append(stream)
                er = EngineRequest(prompt, sampling, self._on_event(index, stream), lambda t, s=stream: s.stopped)
                self.engine_reqs.append(er)

    def _on_event(self, index: int, stream: TextStream):
        """The engine thread's callback for one choice: text (and logprobs) to the asyncio queue."""
        post, queue = self.dispatcher.post, self.queue
        last = [None]  # when this choice's previous token came

        def on_event(token, lp, finish):
            now = time.perf_counter()
            if token is not None:
                delta, _ = stream.push(token)
                first = last[0] is None
                self.metrics.token(now - self.t0 if first else None, None if first else now - last[0])
                last[0] = now
                post(queue, (index, delta, [(token, lp)] if lp is not None else [], None))
            else:
                post(queue, (index, stream.flush(), [], finish))

        return on_event

    def _submit(self) -> None:
        engine = self.served.engine
        try:
            for er in self.engine_reqs:
                engine.submit(er)
        except QueueFull as e:
            self._cancel()
            raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None  # fmt: skip
        except LmforgeError as e:
            self._cancel()
            status = 503 if "not running" in str(e) else 400
            raise ApiError(status, str(e), type="server_error" if status == 503 else "invalid_request_error") from None

    def _cancel(self) -> None:
        for er in self.engine_reqs:
            self.served.engine.cancel(er)

    def _client_gone(self) -> None:
        """A streaming client disconnected: its requests are cancelled; their ends finish the stream (status 499)."""
        if not all(er.finished for er in self.engine_reqs):
            self.gone = True
            self._cancel()

    def _token_logprob(self, token: int, lp: tuple, chat: bool):
        tok = self.served.tokenizer
        text = tok.decode([token], skip_special_tokens=False)
        if chat:

            def entry(t, v, s):
                return {"token": s, "logprob": v, "bytes": list(token_bytes(tok, t))}

            alts = [entry(t, v, tok.decode([t], skip_special_tokens=False)) for t, v in lp[1]]
            return {**entry(token, lp[0], text), "top_logprobs": alts}
        return text, lp[0], {tok.decode([t], skip_special_tokens=False): v for t, v in lp[1]}

    def _usage(self, completion_tokens: int) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}  # fmt: skip

    async def respond(self, chat: bool):
        self._submit()
        self.metrics.prompt_tokens(sum(len(p) for p in self.prompts))
        if self.req.stream:
            return EventStream(self._stream(chat), on_disconnect=self._client_gone)
        return JSONResponse(await self._whole(chat))

    async def _events(self):
        """Lists of (index, text, logprobs, finish) until every choice has finished; cancels them if the task is.

        Each list holds what has arrived, one item per choice: the text of several tokens joined when the
        client is slower than the engine (fewer, larger chunks under load instead of a growing backlog).
        """
        left = len(self.engine_reqs)
        try:
            while left:
                merged = {}
                item = await self.queue.get()
                while True:
                    index, text, lps, finish = item
                    if index in merged:
                        _, t0, l0, _ = merged[index]
                        merged[index] = (index, t0 + text, l0 + lps, finish)
                    else:
                        merged[index] = item
                    left -= finish is not None
                    if self.queue.empty():
                        break
                    item = self.queue.get_nowait()
                yield list(merged.values())
        finally:
            if left:
                self._cancel()

    async def _whole(self, chat: bool) -> dict:
        n = len(self.engine_reqs)
        texts, lps, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        watch = asyncio.create_task(self._watch_disconnect())
        try:
            async for items in self._events():
                for index, text, lp, finish in items:
                    texts[index] += text
                    lps[index] += lp
                    reasons[index] = finish or reasons[index]
        finally:
            watch.cancel()
        self._check_failed(reasons)
        completion = sum(len(er.output) for er in self.engine_reqs)
        self._done(499 if "cancelled" in reasons else 200)  # 499: the client closed the request (nginx's code)
        choices = []
        for i in range(n):
            reason = reasons[i] if reasons[i] in ("stop", "length") else "stop"
            if chat:
                content = {"content": [self._token_logprob(t, lp, True) for t, lp in lps[i]]} if lps[i] else None
                message = {"role": "assistant", "content": texts[i]}
                if self.tool_calls:
                    rest, calls = split_tool_calls(texts[i])
                    if calls:
                        message, reason = (
                            {"role": "assistant", "content": rest or None, "tool_calls": calls},
                            "tool_calls",
                        )
                choices.append({"index": i, "message": message, "logprobs": content,
                                "finish_reason": reason})  # fmt: skip
            else:
                choices.append({"index": i, "text": self._echo(i) + texts[i], "logprobs": self._legacy(lps[i]),
                                "finish_reason": reason})  # fmt: skip
        return {"id": self.id, "object": "chat.completion" if chat else "text_completion", "created": self.created,
                "model": self.served.name, "choices": choices, "usage": self._usage(completion),
                **self.extra}  # fmt: skip

    def _echo(self, i: int) -> str:
        if not getattr(self.req, "echo", False):
            return ""
        return self.served.tokenizer.decode(self.prompts[i // self.req.n], skip_special_tokens=False)

    def _legacy(self, lps: list) -> dict | None:
        """Completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
        if self.logprobs is None:
            return None
        rows = [self._token_logprob(t, lp, False) for t, lp in lps]
        offsets, at = [], 0
        for text, _, _ in rows:
            offsets.append(at)
            at += len(text)
        return {"tokens": [r[0] for r in rows], "token_logprobs": [r[1] for r in rows],
                "top_logprobs": [r[2] for r in rows], "text_offset": offsets}  # fmt: skip

    async def _watch_disconnect(self) -> None:
        """A non-streaming client that hangs up: cancel its requests (a streaming one is cancelled by Starlette)."""
        while True:
            await asyncio.sleep(0.5)
            if await self.http.is_disconnected():
                self._cancel()
                return

    def _check_failed(self, reasons) -> None:
        if "error" in reasons:
            raise ApiError(503, f"the engine failed: {self.served.engine.error}", type="server_error",
                           code="engine_failed")  # fmt: skip

    def _done(self, status: int) -> None:
        self.metrics.request_done(self.endpoint, status, time.perf_counter() - self.t0)
        # Each engine request's callbacks hold this job, which holds them: a reference cycle that only the garbage
        # collector would free, with the request's queue, streams and parsed body. Cut, they go when the job does.
        for er in self.engine_reqs:
            er.on_event, er.stop_check = _ignore_event, None

    async def _stream_tool_calls(self):
        """Streaming when the request offered tools: the reply is gathered first (a `<tool_call>` is only known to be
        one when it closes), then sent as chunks: content, then each call whole, then the finish reason."""
        whole = await self._whole(True)
        base = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.served.name}

        def chunk(choices, **more):
            return f"data: {json.dumps({**base, 'choices': choices, **more}, ensure_ascii=False)}\n\n"

        first = {**self.extra} if self.extra else {}
        yield chunk([{"index": c["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in whole["choices"]], **first)  # fmt: skip
        for c in whole["choices"]:
            msg = c["message"]
            if msg.get("content"):
                yield chunk([{"index": c["index"], "delta": {"content": msg["content"]}, "logprobs": None,
                              "finish_reason": None}])  # fmt: skip
            for j, call in enumerate(msg.get("tool_calls") or []):
                yield chunk([{"index": c["index"], "delta": {"tool_calls": [{"index": j, **call}]}, "logprobs": None,
                              "finish_reason": None}])  # fmt: skip
            yield chunk([{"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}])
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield chunk([], usage=whole["usage"])
        yield DONE

    async def _stream(self, chat: bool):
        if chat and self.tool_calls:
            async for part in self._stream_tool_calls():
                yield part
            return
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        base = {"id": self.id, "object": obj, "created": self.created, "model": self.served.name}
        head = json.dumps(base, ensure_ascii=False)[:-1]  # every chunk's fields, the closing brace left off
        tail = ', "usage": null}' if include_usage else "}"

        def chunk(choices: list[dict]) -> str:
            return f'data: {head}, "choices": {json.dumps(choices, ensure_ascii=False)}{tail}\n\n'

        status, held, ended = 200, "", 0  # held: text that goes out with the next write (one write: see EventStream)
        try:
            if chat:  # the role chunk, with the first text
                held = chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(len(self.engine_reqs))])  # fmt: skip
                if self.extra:  # --rag's sources, once
                    held = held[: -len("}\n\n")] + ", " + json.dumps(self.extra, ensure_ascii=False)[1:] + "\n\n"
            async for items in self._events():
                out = [held]
                for index, text, lp, finish in items:
                    ended += finish is not None
                    if finish == "error":
                        status = 503
                        err = ApiError(503, f"the engine failed: {self.served.engine.error}", type="server_error")
                        yield "".join(out) + f"data: {json.dumps(err.body())}\n\n"
                        return
                    reason = finish if finish in ("stop", "length") else ("stop" if finish else None)
                    if not text and not lp and reason is None:
                        continue
                    if chat:
                        lps = {"content": [self._token_logprob(*e, True) for e in lp]} if lp else None
                        delta = {"content": text} if text or reason is None else {}
                        out.append(chunk([{"index": index, "delta": delta, "logprobs": lps, "finish_reason": reason}]))
                    else:
                        out.append(chunk([{"index": index, "text": text, "logprobs": self._legacy(lp),
                                           "finish_reason": reason}]))  # fmt: skip
                held = "".join(out)
                if held and ended < len(self.engine_reqs):  # the last events wait for the usage and [DONE], below
                    yield held
                    held = ""
            if include_usage:
                completion = sum(len(er.output) for er in self.engine_reqs)
                usage = {**base, "choices": [], "usage": self._usage(completion)}
                held += f"data: {json.dumps(usage)}\n\n"
            status = 499 if self.gone else status
            yield held + DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # cancelled (the server is stopping); _events has cancelled its requests
            raise
        finally:
            self._done(status)


def load_served(model_path: str, *, name: str | None, device: str, max_batch: int, max_context: int | None,
                prefill_chunk: int, max_queue: int, api_key: str | None, max_body: int,
                prefix_cache: int = 4096, rag: str = "", rag_k: int = 4, engine: str = "thread",
                threads: int | None = None) -> Served:  # fmt: skip
    """The engine and what the app needs for a run, checkpoint or imported model. `engine="process"` loads the model
    and steps it in a child process (lmforge/serve/engine_process.py; `lmforge serve`'s default), "thread" here.
    `threads`: torch's threads for the model (0: auto, None: as they are)."""
    from lmforge.chat.template import ChatFormat
    from lmforge.serve.engine_process import EngineSpec, build_engine
    from lmforge.tokenizer import load_tokenizer

    spec = EngineSpec(model_path, device=device, max_batch=max_batch, max_context=max_context,
                      prefill_chunk=prefill_chunk, max_queue=max_queue, prefix_cache=prefix_cache, threads=threads)  # fmt: skip
    if engine == "process":
        eng = EngineProcess.launch(spec)
        tok_dir, info = Path(eng.info["tok_dir"]), eng.info
    else:
        eng, tok_dir, info = build_engine(spec)
    tok = load_tokenizer(tok_dir)
    try:
        chat = ChatFormat(tok_dir)
    except LmforgeError:
        chat = None
    eos = []
    for text in (_eos_text(tok_dir), "<|endoftext|>"):
        tid = tok.token_to_id(text) if text else None
        if tid is not None and tid not in eos:
            eos.append(tid)
    index = None
    if rag:
        from lmforge.rag.index import RagIndex

        if chat is None:
            raise LmforgeError(f"--rag needs a chat model; {model_path} has no chat template")
        index = RagIndex.load(rag)
    return Served(eng, tok, chat, name or Path(model_path).resolve().name, api_key, max_body, eos, rag=index,
                  rag_k=rag_k, info=info)  # fmt: skip


def _eos_text(tok_dir: Path) -> str | None:
    try:
        value = json.loads((Path(tok_dir) / "tokenizer_config.json").read_text("utf-8")).get("eos_token")
    except (OSError, ValueError):
        return None
    return value.get("content") if isinstance(value, dict) else value
