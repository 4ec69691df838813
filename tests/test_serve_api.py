"""`lmforge serve`'s HTTP API, tested with the real `openai` client and raw HTTP against a server on a free
loopback port: `python -m pytest -q tests/test_serve_api.py`.

Outputs equal `generate`'s (greedy and seeded) alone or batched; every kind of bad input gets its OpenAI-shaped
error and status, and after the abuse (200 dropped streams) no slot is held and the next request is served.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from lmforge.serve.api import create_app, load_served
from lmforge.serve.generate import generate
from lmforge.train.checkpoint import load_for_inference
from tests.serve_helpers import ServerThread

openai = pytest.importorskip("openai")

QUESTIONS = ["What is the capital of France?", "Tell me a story.", "你好，今天怎么样？", "2+2=?", "Why?", "Hi"]


def serve(base_run, **kw):
    opts = {"name": "tiny", "device": "cpu", "max_batch": 4, "max_context": None, "prefill_chunk": 16,
            "max_queue": 64, "api_key": None, "max_body": 1 << 20} | kw  # fmt: skip
    return create_app(load_served(str(base_run), **opts))


@pytest.fixture(scope="module", params=["thread", "process"])
def server(base_run, request):
    """The app with its engine in a thread of the test process, or in a child process (`lmforge serve`'s default)."""
    app = serve(base_run, engine=request.param)
    try:
        with ServerThread(app) as url:
            yield url, app.state.served
    finally:
        app.state.served.engine.stop()


@pytest.fixture(scope="module")
def reference(base_run):
    model, _, _ = load_for_inference(base_run)
    return model


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kw)


def expected_chat(served, model, question, max_tokens, **sampling):
    ids = served.chat.encode([{"role": "user", "content": question}], add_generation_prompt=True)
    out = generate(model, [ids], max_tokens, stop_ids=served.chat.stop_ids, **sampling)[0]
    return served.tokenizer.decode(out), len(out)


def post(url, path, body, headers=None, raw=None):
    """(status, parsed JSON body) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.read().decode()


def test_models_health_and_metrics(server):
    url = server[0]
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = json.loads(get(url, "/health"))
    assert health["status"] == "ok" and health["free_slots"] == 4
    metrics = get(url, "/metrics")
    for name in (
        "lmforge_requests_total",
        "lmforge_queue_depth",
        "lmforge_time_to_first_token_seconds_bucket",
        "lmforge_inter_token_latency_seconds_bucket",
        "lmforge_batch_size_bucket",
        "lmforge_free_slots",
    ):
        assert name in metrics  # fmt: skip


def test_chat_equals_generate_streamed_or_not(server, reference):
    url, served = server
    c = client(url)
    for q in QUESTIONS[:3]:
        want, n = expected_chat(served, reference, q, 40, temperature=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=40,
                                      temperature=0)  # fmt: skip
        assert r.choices[0].message.content == want and r.usage.completion_tokens == n
        assert r.choices[0].finish_reason == ("length" if n == 40 else "stop")
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                max_tokens=40, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.completion_tokens == n and chunks[-1].choices == []
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_concurrent_async_requests_equal_each_alone(server, reference):
    url, served = server

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(q, stream, seed):
            kw = {"model": "tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 30,
                  "temperature": 0.8, "seed": seed}  # fmt: skip
            if not stream:
                return (await c.chat.completions.create(**kw)).choices[0].message.content
            parts = [
                ch.choices[0].delta.content or "" async for ch in await c.chat.completions.create(**kw, stream=True)
            ]
            return "".join(parts)

        jobs = [one(q, i % 2 == 0, 100 + i) for i, q in enumerate(QUESTIONS * 2)]  # 12 requests, 4 slots
        return await asyncio.gather(*jobs)

    got = asyncio.run(main())
    for i, q in enumerate(QUESTIONS * 2):
        assert got[i] == expected_chat(served, reference, q, 30, temperature=0.8, seed=100 + i)[0]


def test_completions_prompts_n_logprobs_and_stop(server, reference):
    url, served = server
    c = client(url)
    tok = served.tokenizer
    ids = tok.encode("ROMEO:", add_special_tokens=False).ids
    want = generate(reference, [ids], 12, temperature=0, stop_ids=served.eos_ids)[0]
    r = c.completions.create(model="tiny", prompt=["ROMEO:", "ROMEO:"], max_tokens=12, temperature=0, logprobs=2)
    assert [ch.text for ch in r.choices] == [tok.decode(want)] * 2
    r2 = c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == tok.decode(want)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(want) and all(v <= 0 for v in lp.token_logprobs)
    assert all(
        len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-5)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )  # greedy: the chosen one is the most likely
    text = tok.decode(want)
    stop = text[3:6]
    r = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=1.0, n=3, seed=7)
    assert len(r.choices) == 3 and [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1  # seed, seed+1, seed+2
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)


BAD = [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools.0.function",
    ),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 500}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    code, err = post(server[0], "/v1/chat/completions", body)
    assert code == status and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]


@pytest.mark.parametrize("raw,what", [(b"{not json", "not valid JSON"), (b'{"model": "tiny", "temperature": NaN}',
                                      "NaN"), (b"[1, 2]", "JSON object")])  # fmt: skip
def test_malformed_json_and_nan(server, raw, what):
    code, err = post(server[0], "/v1/chat/completions", None, raw=raw)
    assert code == 400 and what in err["error"]["message"]


def _raw_post(url, headers: str, body: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest[rest.index(b"{") : rest.rindex(b"}") + 1])


def test_big_body_unknown_routes_and_methods(server):
    url = server[0]
    # A 10 MB body is refused from its Content-Length, before it is read ...
    code, err = _raw_post(url, f"Content-Length: {10 << 20}\r\n", b'{"x": "' + b"a" * 65536)
    assert code == 413 and err["error"]["code"] == "body_too_large"
    # ... and one without a length (chunked) as soon as the bytes read pass the limit.
    chunk = b"a" * (256 << 10)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    code, err = _raw_post(url, "Transfer-Encoding: chunked\r\n", body)
    assert code == 413 and err["error"]["code"] == "body_too_large"
    code, err = post(url, "/v1/nothing", {})
    assert code == 404 and "error" in err
    try:
        get(url, "/v1/chat/completions")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and "error" in json.loads(e.read())


def test_api_key_is_required_and_checked(base_run):
    with ServerThread(serve(base_run, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        code, err = post(url, "/v1/chat/completions", {"model": "tiny"}, headers={"Authorization": "Bearer nope"})
        assert code == 401 and err["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3)
        assert json.loads(get(url, "/health"))["status"] == "ok"  # health stays open for probes


def test_full_queue_answers_429_at_once(base_run):
    app = serve(base_run, max_batch=1, max_queue=0)
    engine = app.state.served.engine
    step = engine.step
    engine.step = lambda: time.sleep(0.05) or step()  # a slow model: the first request holds the slot for seconds
    with ServerThread(app) as url:
        c = client(url)
        stream = c.completions.create(model="tiny", prompt="a", max_tokens=100, temperature=0, stream=True)
        next(iter(stream))  # it holds the only slot now
        t0 = time.time()
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="b", max_tokens=5)
        assert time.time() - t0 < 5
        stream.close()


def _drop_streams(url, count):
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 100, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        s.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(s)
    for s in socks[: count // 2]:
        s.recv(200)  # half of them saw their stream start
    for s in socks:
        s.close()


def peak_rss_kib(pid: int) -> int:
    """A process's peak resident memory (VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_dropped_streams_free_their_slots_and_the_server_goes_on(base_run, engine_kind):
    app = serve(base_run, max_batch=4, max_queue=300, engine=engine_kind)
    with ServerThread(app) as url:
        engine = app.state.served.engine
        pids = [os.getpid()] + ([engine.proc.pid] if engine_kind == "process" else [])
        _drop_streams(url, 200)
        rss = []
        for _ in range(2):
            deadline = time.time() + 60
            while engine.load() != {"waiting": 0, "running": 0, "free_slots": 4} and time.time() < deadline:
                time.sleep(0.1)
            assert engine.load() == {"waiting": 0, "running": 0, "free_slots": 4}
            assert engine.stats["generated"] < 200 * 100 // 4  # the dropped ones did not run to the end
            rss.append([peak_rss_kib(pid) for pid in pids])
            _drop_streams(url, 200)
        r = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=5)  # fmt: skip
        assert r.choices[0].message.role == "assistant"
        for before, after in zip(*rss):
            assert after - before < 50 * 1024  # KiB: a second round of 200 leaks nothing measurable, in either process
        metrics = get(url, "/metrics")
        assert "lmforge_running_requests 0.0" in metrics


def test_non_finite_and_extreme_values_are_refused(server):
    for value in (math.inf, -math.inf):
        raw = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": value}).encode()
        assert post(server[0], "/v1/chat/completions", None, raw=raw)[0] == 400


def test_chat_url_gives_the_local_chat_transcript(server, base_run, monkeypatch, capsys):
    import io

    from lmforge.cli import main

    greedy = ["--temperature", "0", "--top-k", "0", "--top-p", "1", "--repetition-penalty", "1", "--max-new-tokens",
              "20"]  # fmt: skip
    transcripts = []
    for target in (["--url", server[0]], [str(base_run)]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nHow are you?\n/exit\n"))
        assert main(["chat", *target, *greedy]) == 0
        transcripts.append(capsys.readouterr().out)
    assert transcripts[0] == transcripts[1] and transcripts[0].count("assistant: ") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--url", "http://127.0.0.1:9", "--max-new-tokens", "5"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_serve_command_binds_loopback_prints_its_url_and_stops_on_sigterm(base_run):
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(base_run), "--port", "0", "--max-batch",
                             "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stderr.readline()
        url = re.search(r"at (http://[\d.]+:\d+)", line).group(1)
        assert url.startswith("http://127.0.0.1:") and "2 slots x 128 tokens" in line
        deadline = time.time() + 30
        while True:
            try:
                assert json.loads(get(url, "/health"))["model"] == "run"
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline
                time.sleep(0.1)
        children = [pid for pid in _children(proc.pid) if "engine_process" in _cmdline(pid)]
        assert len(children) == 1  # the model steps in a process of its own (the default engine)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
        assert time.time() - t0 < 10
        time.sleep(0.5)
        assert not os.path.exists(f"/proc/{children[0]}") or "engine_process" not in _cmdline(children[0])
    finally:
        proc.kill()


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_serve_command_refuses_bad_settings_in_one_line(base_run, capsys):
    from lmforge.cli import main

    assert main(["serve", str(base_run), "--max-context", "999"]) == 2
    err = capsys.readouterr().err
    assert "max-context" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", str(base_run), "--max-batch", "0"]) == 2
    capsys.readouterr()
    with socket.socket() as busy:  # a port already taken: one line, exit 2
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(base_run), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1


def test_auto_threads_gives_big_models_every_core():
    from lmforge.serve.engine_process import auto_threads

    assert auto_threads(2, 135_000_000) == 2  # SmolLM2-135M: the products decide a step
    assert auto_threads(2, 4_300_000) == 1  # the demo model: the HTTP side needs the other core
    assert auto_threads(1, 4_300_000) == 1 and auto_threads(16, 1_000_000) == 15
