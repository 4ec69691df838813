"""The engine in a child process (lmforge/serve/engine_process.py), without HTTP and through the app:
`python -m pytest -q tests/test_serve_process.py`.

Its tokens equal the in-process engine's and `generate`'s (greedy and seeded, logprobs included); a stop check ends
a request at once; a full queue refuses at once; a bad model gives the child's one-line error; a child that dies
fails what was pending (503, /health 503) instead of hanging it; a child whose server is gone exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from lmforge.errors import LmforgeError
from lmforge.serve.engine import QueueFull, Request, Sampling
from lmforge.serve.engine_process import EngineProcess, EngineSpec, _frame, _unframe
from lmforge.serve.generate import generate
from lmforge.train.checkpoint import load_for_inference
from tests.test_serve_engine import Sink

PROMPTS = [[5, 6, 7, 8], list(range(10, 40)), [3], [9, 9, 9, 1, 2]]


def spec(base_run, **kw) -> EngineSpec:
    return EngineSpec(str(base_run), device="cpu", max_batch=kw.pop("max_batch", 2), threads=1, **kw)


def drive(engine: EngineProcess, reqs: list[Request], submit: bool = True, timeout: float = 60) -> None:
    """Start the engine in a fresh event loop, submit the requests (unless they were) and run until all have finished."""

    async def main():
        engine.start()
        for r in reqs if submit else []:
            engine.submit(r)
        deadline = time.monotonic() + timeout
        while not all(r.on_event.finish for r in reqs):
            assert time.monotonic() < deadline, "the engine process did not finish the requests"
            await asyncio.sleep(0.005)
        engine.loop.remove_reader(engine.sock.fileno())

    asyncio.run(main())


def test_frames_round_trip_whole_and_in_pieces():
    msgs = [("submit", 3, [1, 2, 3], (16, 0.0, 1.0, 0, None, 0.0, 0.0, 1.0, (2,), 3)), ("cancel", 3),
            ("step", 4, 0.001, 0, 4, 99, None, [(3, 17, (-0.5, [(17, -0.5)]), None), (3, None, None, "stop")])]  # fmt: skip
    wire = b"".join(_frame(m) for m in msgs)
    got, buf = [], bytearray()
    for i in range(0, len(wire), 7):  # a socket may hand a message over in any number of pieces
        buf += wire[i : i + 7]
        got += _unframe(buf)
    assert got == msgs and not buf


def test_tokens_equal_generate_greedy_and_seeded_with_logprobs(base_run):
    model, _, _ = load_for_inference(base_run)
    engine = EngineProcess.launch(spec(base_run))  # 2 slots: the 8 requests queue, are admitted and retire midway
    try:
        reqs = [Request(p, Sampling(max_tokens=12, temperature=0, logprobs=2), Sink()) for p in PROMPTS]
        reqs += [Request(p, Sampling(max_tokens=12, temperature=0.9, top_k=20, seed=7 + i), Sink())
                 for i, p in enumerate(PROMPTS)]  # fmt: skip
        drive(engine, reqs)
        for r in reqs:
            s = r.sampling
            want = generate(model, [r.prompt], 12, temperature=s.temperature, top_k=s.top_k or None, seed=s.seed)[0]
            assert r.on_event.tokens == want and r.output == want and r.on_event.finish == "length"
        lp = reqs[0].on_event.logprobs[0]
        assert lp[0] <= 0 and len(lp[1]) == 2 and lp[1][0][1] >= lp[1][1][1]
        assert engine.load() == {"waiting": 0, "running": 0, "free_slots": 2}
        assert engine.stats["generated"] == 12 * len(reqs)
    finally:
        engine.stop()
    assert engine.proc.returncode == 0


def test_stop_check_ends_at_once_and_a_full_queue_refuses(base_run):
    engine = EngineProcess.launch(spec(base_run, max_batch=1, max_queue=1))
    try:
        stopped = Request(PROMPTS[1], Sampling(max_tokens=50, temperature=0), Sink(), stop_check=lambda t: True)
        waiting = Request(PROMPTS[0], Sampling(max_tokens=5, temperature=0), Sink())
        engine.submit(stopped)
        engine.submit(waiting)  # 1 slot + a queue of 1: full
        with pytest.raises(QueueFull):
            engine.submit(Request(PROMPTS[2], Sampling(max_tokens=5), Sink()))
        with pytest.raises(LmforgeError, match="exceeds the context"):
            engine.submit(Request(PROMPTS[2], Sampling(max_tokens=10_000), Sink()))
        drive(engine, [stopped, waiting], submit=False)  # sent when the loop starts
        assert stopped.on_event.finish == "stop" and len(stopped.on_event.tokens) == 1 and len(stopped.output) == 1
        assert waiting.on_event.finish == "length" and len(waiting.on_event.tokens) == 5
    finally:
        engine.stop()


def test_a_bad_model_or_setting_gives_the_childs_one_line_error(base_run, tmp_path):
    with pytest.raises(LmforgeError) as e:
        EngineProcess.launch(EngineSpec(str(tmp_path / "nothing-here"), device="cpu", threads=1))
    assert "nothing-here" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="max-context"):
        EngineProcess.launch(spec(base_run, max_context=100_000))


def test_the_child_exits_when_its_server_is_gone(base_run):
    engine = EngineProcess.launch(spec(base_run))
    engine.sock.close()  # what the kernel does for a server killed with SIGKILL
    assert engine.proc.wait(timeout=30) == 0


def test_a_dead_child_fails_the_pending_requests_and_health_says_so(base_run):
    from lmforge.serve.api import create_app, load_served
    from tests.serve_helpers import ServerThread

    served = load_served(str(base_run), name="tiny", device="cpu", max_batch=2, max_context=None, prefill_chunk=16,
                         max_queue=8, api_key=None, max_body=1 << 20, engine="process", threads=1)  # fmt: skip
    with ServerThread(create_app(served)) as url:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 100, "stream": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        pid = served.engine.proc.pid
        os.kill(pid, signal.SIGSTOP)  # a stopped child: the request is in, no token can come (nor an early end)
        with urllib.request.urlopen(req, timeout=30) as stream:  # the stream's headers come at once
            os.kill(pid, signal.SIGKILL)
            rest = stream.read().decode()  # the stream ends instead of hanging
        assert '"engine_failed"' in rest or "the engine" in rest
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health", timeout=30)
        assert e.value.code == 503 and "engine process exited" in e.value.read().decode()
        body["stream"] = False
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                                          headers={"Content-Type": "application/json"}), timeout=30)  # fmt: skip
        assert e.value.code == 503
