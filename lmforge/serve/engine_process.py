"""The serving engine in a process of its own (`lmforge serve`'s default): the model steps there, the HTTP side here.

    engine = EngineProcess.launch(EngineSpec("runs/demo/sft", max_batch=16))   # loads the model in the child
    engine.start()                     # in the server's event loop: the child's events are read there
    engine.submit(req)                 # an engine.Request; its on_event is called in the event loop's thread
    engine.cancel(req); engine.load(); engine.stop()

Why a process: in one process the engine thread and the HTTP event loop share one GIL. A step makes ~80 torch and
C calls, each releasing the GIL and taking it back, and each take waits while the loop runs Python (a request's
parsing, chat template, JSON chunks). At 16 streaming clients on 2 cores a demo-model step took 8.2 ms served against
3.1 ms alone, the engine thread on 0.57 of a core (BENCHMARKS.md, "Serving", session 22). vLLM runs its engine core
apart from its API server for the same reason.

The two talk over a socket pair: each message is a 4-byte length and a `marshal`ed tuple (plain values only: nothing
is unpickled). Here -> child: ("submit", id, prompt, sampling fields), ("cancel", id), ("ack", steps handled),
("stop",). Child -> here: ("ready", info) or ("failed", message) once, then after every step ("step", rows, seconds,
waiting, running, generated, prefix hit tokens, events), each event (id, token, logprobs, finish) as
`Request.on_event` takes them; the child runs at most `AHEAD` steps past the last one acknowledged.
Stop strings are watched here (the text is here): a request whose text hit one ends at once and the child is told to
cancel it, so it may decode a token or two more that nobody sees (as vLLM's detokenizer does). The child exits when
its socket closes, so it never outlives the server; if it dies, every pending request ends with "error" and /health
answers 503.

    python -m pytest -q tests/test_serve_process.py
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import json
import marshal
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.serve.engine import QueueFull, Request, Sampling, check_request

_HEADER = struct.Struct("<I")
# Steps the child may run ahead of the server's handling of their events (each step message is acknowledged).
# Unbounded, the engine (a core to itself) out-ran a busy event loop at 64 clients on 2 cores: the loop fell behind on
# everything, new requests' first tokens included (time-to-first-token p99 260 and 332 ms against 181 and 194 ms at 2;
# BENCHMARKS.md, "Serving", session 22). 2 rather than 1 lets a step overlap the loop's work where cores are spare.
AHEAD = 2
_SAMPLING = [f.name for f in dataclasses.fields(Sampling)]


@dataclass
class EngineSpec:
    """What the engine is built from, in either process (`build_engine`)."""

    model: str
    device: str = "auto"
    max_batch: int = 16
    max_context: int | None = None
    prefill_chunk: int = 256
    max_queue: int = 256
    prefix_cache: int = 4096
    threads: int | None = None  # torch threads for the model (0: `auto_threads`; None: leave torch's setting)


def auto_threads(cores: int, params: int) -> int:
    """The model's thread count for `--threads 0`: all cores when its matrix products decide a step, all but one when
    the per-token work of the HTTP side and of local clients does.

    Measured on a 2-core Xeon at 16 streaming clients (BENCHMARKS.md, "Serving"): SmolLM2-135M served 1.36-1.41x
    more tokens/s with 2 threads than with 1 (a 16-row step is ~4 GFLOP of products); the 4.3M-parameter demo model
    5% fewer (its step is ~1 ms, and the spare core runs the HTTP loop and the clients).
    """
    return cores if params >= 32_000_000 else max(1, cores - 1)


def build_engine(spec: EngineSpec):
    """(Engine, tokenizer folder, info) for a spec: the model loaded, torch's threads set, the KV cache allocated."""
    import torch

    from lmforge.serve.engine import Engine
    from lmforge.train.checkpoint import load_for_inference
    from lmforge.train.common import pick_device

    model, tok_dir, _ = load_for_inference(spec.model, device=pick_device(spec.device))
    params = sum(p.numel() for p in model.parameters())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    if spec.threads is not None:
        torch.set_num_threads(spec.threads or auto_threads(cores, params))
    # Every slot holds max_context positions from the start: 2048 keeps 16 slots of a 135M model near 1.5 GB.
    max_context = spec.max_context or min(model.cfg.max_seq_len, 2048)
    engine = Engine(model, max_batch=spec.max_batch, max_context=max_context, prefill_chunk=spec.prefill_chunk,
                    max_queue=spec.max_queue, prefix_cache=spec.prefix_cache)  # fmt: skip
    info = {"tok_dir": str(tok_dir), "max_context": max_context, "vocab_size": model.cfg.vocab_size,
            "kv_mib": 2 * engine.cache.k.numel() * engine.cache.k.element_size() / 2**20, "params": params,
            "threads": torch.get_num_threads(), "prefix_cache": engine.prefixes is not None}  # fmt: skip
    return engine, tok_dir, info


def _frame(msg: tuple) -> bytes:
    body = marshal.dumps(msg)
    return _HEADER.pack(len(body)) + body


def _unframe(buf: bytearray) -> list[tuple]:
    """The whole messages at the start of buf (removed from it)."""
    out, at = [], 0
    while len(buf) - at >= 4:
        (n,) = _HEADER.unpack_from(buf, at)
        if len(buf) - at - 4 < n:
            break
        out.append(marshal.loads(bytes(buf[at + 4 : at + 4 + n])))
        at += 4 + n
    del buf[:at]
    return out


class EngineProcess:
    """The parent's side: the `Engine` API the HTTP app uses (submit, cancel, load, error, stop), over the socket."""

    def __init__(self, spec: EngineSpec, proc: subprocess.Popen, sock: socket.socket, info: dict):
        self.proc, self.sock, self.info = proc, sock, info
        self.max_batch, self.max_queue = spec.max_batch, spec.max_queue
        self.max_context, self.vocab_size = info["max_context"], info["vocab_size"]
        self.thread = None  # the app's lifespan starts an engine whose thread is None
        self.error: BaseException | None = None
        self.on_step = None
        self.stats = collections.Counter()
        self.prefix_hit_tokens = 0 if info["prefix_cache"] else None
        self.pending: dict[int, Request] = {}
        self.ids = itertools.count()
        self.waiting = self.running = 0
        self.inbox, self.outbox = bytearray(), bytearray()
        self.loop = None

    @classmethod
    def launch(cls, spec: EngineSpec, timeout: float = 600) -> EngineProcess:
        """Start the child, wait until its model is loaded; LmforgeError with the child's own message if it fails."""
        mine, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "lmforge.serve.engine_process", str(theirs.fileno()),
               json.dumps(dataclasses.asdict(spec))]  # fmt: skip
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        buf, deadline = bytearray(), time.monotonic() + timeout
        while True:
            msgs = _unframe(buf)
            if msgs:
                break
            ready, _, _ = select.select([mine], [], [], 0.5)
            data = mine.recv(1 << 16) if ready else b""
            if ready and not data or not ready and (proc.poll() is not None or time.monotonic() > deadline):
                proc.kill()
                mine.close()
                raise LmforgeError(f"the engine process for {spec.model} exited (status {proc.wait()}) before it was "
                                   "ready")  # fmt: skip
            buf += data
        kind, payload = msgs[0]
        if kind != "ready":
            proc.wait(timeout=30)
            mine.close()
            raise LmforgeError(payload)
        mine.setblocking(False)
        return cls(spec, proc, mine, payload)

    # ------------------------------------------------------------------ the Engine API (the event loop's thread)

    def start(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self._flush()

    def submit(self, req: Request) -> None:
        if self.error is not None:  # set as soon as the child's socket closes (`_died`)
            raise LmforgeError("the engine is not running")
        check_request(req, self.max_context, self.vocab_size)
        if len(self.pending) >= self.max_queue + self.max_batch:  # waiting + running: as Engine.submit counts
            raise QueueFull(f"{len(self.pending) - self.max_batch} requests are waiting (--max-queue {self.max_queue})")
        req.rid = rid = next(self.ids)
        self.pending[rid] = req
        s = req.sampling
        self._send(("submit", rid, list(req.prompt), tuple(getattr(s, f) for f in _SAMPLING)))

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        if self.pending.get(req.rid) is req:
            self._send(("cancel", req.rid))

    def load(self) -> dict:
        return {"waiting": self.waiting, "running": self.running, "free_slots": self.max_batch - self.running}

    def stop(self) -> None:
        if self.sock.fileno() == -1:
            return  # stopped already
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
        try:
            self.sock.setblocking(True)
            self.sock.sendall(bytes(self.outbox) + _frame(("stop",)))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self._fail_all("cancelled")

    # ------------------------------------------------------------------ the socket

    def _send(self, msg: tuple) -> None:
        was_empty = not self.outbox  # else a writer is waiting for the socket already
        self.outbox += _frame(msg)
        if self.loop is not None and was_empty:
            self._flush()

    def _flush(self) -> None:
        """Write what the socket takes now; the rest when it is writable (the child reads between steps)."""
        try:
            n = self.sock.send(self.outbox) if self.outbox else 0
        except BlockingIOError:
            n = 0
        except OSError:
            return  # the child is gone: _readable sees the end and fails the requests
        del self.outbox[:n]
        if self.outbox:
            self.loop.add_writer(self.sock.fileno(), self._flush)
        else:
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        self.inbox += data
        steps = 0
        for msg in _unframe(self.inbox):
            if msg[0] == "step":
                self._step(*msg[1:])
                steps += 1
            elif msg[0] == "failed":
                self.error = LmforgeError(msg[1])
        if steps:
            self._send(("ack", steps))

    def _step(self, rows, seconds, waiting, running, generated, hits, events) -> None:
        self.waiting, self.running, self.stats["generated"] = waiting, running, generated
        if hits is not None:
            self.prefix_hit_tokens = hits
        if rows and self.on_step is not None:
            self.on_step(rows, seconds)
        for rid, token, lp, finish in events:
            req = self.pending.get(rid)
            if req is None:  # ended here already (a stop string)
                continue
            if token is None:
                self._end(rid, finish)
                continue
            req.output.append(token)
            req.on_event(token, lp, None)
            if req.stop_check is not None and req.stop_check(token):
                self._end(rid, "stop")
                self._send(("cancel", rid))

    def _end(self, rid: int, reason: str) -> None:
        req = self.pending.pop(rid)
        req.finished = True
        req.on_event(None, None, reason)

    def _died(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        code = self.proc.poll()  # None when its socket closed a moment before it exited
        if self.error is None:
            self.error = LmforgeError("the engine process exited" + (f" (status {code})" if code is not None else ""))
        self.waiting = self.running = 0
        self._fail_all("error")

    def _fail_all(self, reason: str) -> None:
        for rid in list(self.pending):
            self._end(rid, reason)


# ---------------------------------------------------------------------- the child


def child(fd: int, spec: EngineSpec) -> int:
    """The engine process: build the engine, then step it, reading requests between steps, until told to stop or the
    socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole terminal: the server stops this process
    sock = socket.socket(fileno=fd)

    def send(msg: tuple) -> None:
        sock.sendall(_frame(msg))

    if spec.threads is None:
        spec = dataclasses.replace(spec, threads=0)
    # The parent counts a request that hit a stop string as ended while this side still has it until the cancel
    # arrives, so it may send up to max_batch more than this queue would take: room for them.
    spec = dataclasses.replace(spec, max_queue=spec.max_queue + spec.max_batch)
    try:
        engine, _, info = build_engine(spec)
    except Exception as e:  # noqa: BLE001 - a bad model path or config: its one-line message goes to the parent
        send(("failed", str(e) if isinstance(e, LmforgeError) else f"{type(e).__name__}: {e}"))
        return 1
    gc.collect()  # the model, torch and the engine stay till the end: no full collection walks them (api.py too)
    gc.freeze()
    send(("ready", info))
    events, steps, reqs, inbox = [], [], {}, bytearray()
    engine.on_step = lambda rows, seconds: steps.append((rows, seconds))

    def on_event(rid):
        def record(token, lp, finish):
            events.append((rid, token, lp, finish))
            if finish is not None:
                reqs.pop(rid, None)

        return record

    stepped, unacked = False, 0
    while True:
        # between steps: whatever arrived; with nothing running, or AHEAD steps the server has not handled yet, wait
        if select.select([sock], [], [], 0 if stepped and unacked < AHEAD else None)[0]:
            data = sock.recv(1 << 20)
            if not data:
                return 0  # the server is gone
            inbox += data
            for msg in _unframe(inbox):
                if msg[0] == "submit":
                    _, rid, prompt, fields = msg
                    reqs[rid] = req = Request(prompt, Sampling(**dict(zip(_SAMPLING, fields))), on_event(rid))
                    try:
                        engine.submit(req)
                    except Exception as e:  # noqa: BLE001 - the parent checked it already; should this side differ
                        print(f"lmforge engine: request refused: {e}", file=sys.stderr)
                        reqs.pop(rid)
                        events.append((rid, None, None, "error"))
                elif msg[0] == "ack":
                    unacked -= msg[1]
                elif msg[0] == "cancel" and msg[1] in reqs:
                    engine.cancel(reqs[msg[1]])
                elif msg[0] == "stop":
                    engine.stop()
                    return 0
        try:
            stepped = engine.step()
        except BaseException as e:  # a bug or out of memory: the parent fails every request and answers 503
            send(("failed", f"the engine failed: {type(e).__name__}: {e}"))
            raise
        if stepped or events:  # a step, or requests cancelled while waiting
            rows, seconds = steps[-1] if steps else (0, 0.0)
            load = engine.load()
            send(("step", rows, seconds, load["waiting"], load["running"], engine.stats["generated"],
                  engine.prefix_hit_tokens, events[:]))  # fmt: skip
            events.clear()
            steps.clear()
            unacked += 1


if __name__ == "__main__":
    fd, raw = int(sys.argv[1]), json.loads(sys.argv[2])
    sys.exit(child(fd, EngineSpec(**raw)))
