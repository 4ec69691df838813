"""Load test for any OpenAI-compatible server on loopback: streaming chat clients at several concurrencies.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000                  # server already running
    python benchmarks/serve_load.py --launch "lmforge serve runs/demo/sft --max-batch 64" \\
        --concurrency 1,4,16,64 --duration 30 --max-tokens 64 --json /tmp/serve_bench/lmforge-sft.json
    python benchmarks/serve_load.py --launch "transformers serve --continuous-batching --device cpu \\
        /tmp/hf-sft" --json /tmp/serve_bench/tf-sft.json             # the same load on transformers serve
    python benchmarks/serve_load.py --report lmforge-sft.json tf-sft.json       # tables (+ ratios) from saved runs

The clients are aiohttp's (vLLM's benchmark_serving.py uses it too): the client shares the machine with the server,
and httpx (the `openai` client's HTTP library) took 3.2 CPU-ms a request against aiohttp's 0.8, enough to be what
limited a fast server at 16 clients on 2 cores (BENCHMARKS.md, "Serving", session 22). They run on uvloop where it is
installed (the loop uvicorn runs servers on): 0.70 CPU-ms a request against asyncio's 0.87-0.97 at 16 clients on 2
cores, where the client's CPU was taken from the server's (session 23).

`--rounds R` runs the levels in turn R times (1, 16, 1, 16, ...), each round `--duration` seconds per level, and
gives each level's figures over all its rounds, plus each round's ratio to 1 client: on a machine whose speed drifts
from minute to minute (a shared VM), levels run minutes apart compare the machine's moods as much as the server.

Each level runs C clients for `--duration` seconds. A client loops: one streaming POST
/v1/chat/completions (stream_options.include_usage, temperature 0, max_tokens), read to its end, the
next. A request started before the deadline runs to its end; `--max-requests` caps a level. Per
request: TTFT = send to the first non-empty content delta; per-token latency = (t_last - t_first) /
(completion tokens - 1), as vLLM's TPOT; completion tokens = the usage chunk's. Those are real tokens, as many as the
server generated: the OpenAI API has no ignore_eos, so a model that stops early does less work, which
is why the table shows tokens per request (at temperature 0 both servers should stop alike). Errors:
non-200, an error object in the stream, a malformed stream (bad JSON, no usage chunk, neither a
finish_reason nor `[DONE]`) or an exception; the first few messages are kept. A stream that ends
after its finish_reason without `[DONE]` (transformers serve) is accepted, as the openai client
does, and counted apart. Per level: p50/p99 TTFT and per-token latency, aggregate output tokens/s =
all completion tokens / the level's wall time (first send to last byte), its ratio to the 1-client
level, the client's own CPU seconds (it shares the machine with the server) and the load average
before and after. All clients start at once, so each level opens with a burst of C prompts; the JSON
also has the p99 TTFT of the requests sent after that burst, and every request's measurements.

`--launch CMD` starts the server (its output to `--server-log`), waits for GET /health (or
/v1/models), kills its process group at the end; without it, start the server yourself and pass
`--url`. The first few requests (`--warmup`) are not measured; their texts are kept in the JSON, to
check that two servers answer alike. A Markdown table for BENCHMARKS.md is printed at the end;
benchmarks/serve_compare.sh runs lmforge serve and transformers serve on two models.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

try:  # the client on uvloop where installed (uvicorn[standard] brings it; lmforge serve runs on it): see the docstring
    import uvloop

    RUN, LOOP = uvloop.run, "uvloop"
except ImportError:
    RUN, LOOP = asyncio.run, "asyncio"

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "How do plants make their food?",
    "What is the difference between weather and climate?",
    "Explain what a prime number is.",
    "Name a few ways to save water at home.",
]
KEEP_ERRORS = 5


@dataclass
class Result:
    """One request's measurements (times in seconds from its send)."""

    prompt: int
    start: float = 0.0  # seconds from the level's start to the send
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    per_token: float | None = None  # time per output token after the first (see per_token)
    chunks: int = 0
    tokens: int = 0  # completion tokens from the usage chunk
    total: float = 0.0
    finish: str | None = None
    done_marker: bool = False  # the stream ended with `data: [DONE]`
    text: str = ""


@dataclass
class Level:
    concurrency: int
    wall_s: float = 0.0
    results: list[Result] = field(default_factory=list)
    load_before: tuple = ()
    load_after: tuple = ()
    client_cpu_s: float = 0.0


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def one_request(
    client: aiohttp.ClientSession, url: str, body: dict, prompt: int, level_t0: float = 0.0
) -> Result:
    """One streaming chat completion, read line by line as server-sent events."""
    t0 = time.perf_counter()
    r = Result(prompt=prompt, start=round(t0 - level_t0, 3) if level_t0 else 0.0)
    times, text, done, usage_seen = [], [], False, False
    try:
        async with client.post(url, json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.read()).decode(errors='replace')[:300]}"
                return r
            async for line in resp.content:  # aiohttp's reader splits at b"\n"
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    r.error = f"error in stream: {json.dumps(obj['error'])[:300]}"
                    return r
                for ch in obj.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        times.append(time.perf_counter() - t0)
                        text.append(content)
                    r.finish = ch.get("finish_reason") or r.finish
                if isinstance(obj.get("usage"), dict):
                    r.tokens = int(obj["usage"]["completion_tokens"])
                    usage_seen = True
        r.total = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a timeout, a dropped connection, bad JSON: counted, the client goes on
        r.total = time.perf_counter() - t0
        r.error = f"{type(e).__name__}: {e}"[:300]
        return r
    r.chunks, r.text = len(times), "".join(text)
    if times:
        r.ttft = times[0]
        r.per_token = per_token(times[-1] - times[0], r.tokens, len(times))
    r.done_marker = done
    if not done and r.finish is None:  # no [DONE] is tolerated (as the openai client does) after a finish_reason
        r.error = "malformed stream: ended without a finish_reason or [DONE]"
    elif not usage_seen:
        r.error = "malformed stream: no usage chunk (stream_options.include_usage ignored?)"
    else:
        r.ok = True
    return r


def request_body(args, prompt: str) -> dict:
    return {"model": args.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
            "temperature": args.temperature}  # fmt: skip


async def run_level(client: aiohttp.ClientSession, args, prompts: list[str], concurrency: int) -> Level:
    url = args.url + "/v1/chat/completions"
    level = Level(concurrency, load_before=os.getloadavg())
    cap = args.max_requests
    counter = iter(range(cap))  # shared: the prompt index and the request cap

    async def client_loop():
        while time.perf_counter() < deadline:
            i = next(counter, None)
            if i is None:
                return
            k = i % len(prompts)
            level.results.append(await one_request(client, url, request_body(args, prompts[k]), k, t0))

    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + args.duration
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    level.wall_s = time.perf_counter() - t0
    level.client_cpu_s = time.process_time() - cpu0
    level.load_after = os.getloadavg()
    return level


def per_token(span: float, tokens: int, chunks: int) -> float | None:
    """Time per output token after the first (vLLM's TPOT): the span from the first to the last content chunk over
    the tokens after the first. Tokens, not chunks: a server may send several tokens in one chunk when the
    client falls behind. (transformers serve counts its end token in usage, which lowers its figure by one token
    per request that stopped.)"""
    n = tokens or chunks
    return span / (n - 1) if n > 1 and chunks > 1 else None


def summarize(rounds: list[Level]) -> dict:
    """One level's figures over its rounds (`--rounds`): every request of every round, the wall times added."""
    level = rounds[0]
    results = [r for lv in rounds for r in lv.results]
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    ttft_after = []
    for lv in rounds:  # the first request of every client arrives at once: a burst; the rest as slots free up
        first = sorted(r.start for r in lv.results)[: lv.concurrency]
        cut = first[-1] if first else 0.0
        ttft_after += [r.ttft for r in lv.results if r.ok and r.ttft is not None and r.start > cut]
    itl = [r.per_token for r in ok if r.per_token is not None]
    tokens = sum(r.tokens for r in ok)
    wall = sum(lv.wall_s for lv in rounds)
    errors = [r.error for r in results if not r.ok]

    def ms(x):
        return None if x is None else round(1000 * x, 1)

    return {
        "concurrency": level.concurrency, "requests": len(results), "errors": len(errors),
        "error_messages": list(dict.fromkeys(errors))[:KEEP_ERRORS], "wall_s": round(wall, 2),
        "completion_tokens": tokens, "tokens_per_request": round(tokens / len(ok), 1) if ok else None,
        "chunks_per_request": round(sum(r.chunks for r in ok) / len(ok), 1) if ok else None,
        "without_done_marker": sum(not r.done_marker for r in ok),
        "finish_reasons": {f: sum(r.finish == f for r in ok) for f in sorted({str(r.finish) for r in ok})},
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "ttft_p99_after_burst_ms": ms(percentile(ttft_after, 99)), "requests_after_burst": len(ttft_after),
        "per_token_p50_ms": ms(percentile(itl, 50)), "per_token_p99_ms": ms(percentile(itl, 99)),
        "request_p50_s": round(percentile([r.total for r in ok], 50) or 0, 2),
        "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "tokens_per_s_rounds": [round(sum(r.tokens for r in lv.results if r.ok) / lv.wall_s, 1) if lv.wall_s else 0.0
                                for lv in rounds],
        "client_cpu_s": round(sum(lv.client_cpu_s for lv in rounds), 1),
        "load_before": [round(x, 2) for x in level.load_before],
        "load_after": [round(x, 2) for x in rounds[-1].load_after],
    }  # fmt: skip


# ---------------------------------------------------------------------- the server: launch, wait, stop


def launch(cmd: str, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"launching: {cmd}  (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        # its own process group: stopping it also stops whatever it spawned, and nothing else
        return subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


async def wait_ready(client: aiohttp.ClientSession, url: str, proc: subprocess.Popen | None, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready (see its log)")
        try:
            for path in ("/health", "/v1/models"):  # not every OpenAI-compatible server has /health
                async with client.get(url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - t0
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"neither {url}/health nor /v1/models answered 200 within {timeout:.0f} s")


# ---------------------------------------------------------------------- the run and its tables


async def bench(args) -> dict:
    prompts = PROMPTS if not args.prompt_set else load_prompts(args.prompt_set)
    conns = max(args.concurrency) + 8
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, connect=10)
    proc = launch(args.launch, Path(args.server_log)) if args.launch else None
    out: dict = {}
    try:
        connector = aiohttp.TCPConnector(limit=conns)  # keep-alive connections, as many as the clients
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:
            ready = await wait_ready(client, args.url, proc, args.launch_timeout)
            if proc is not None:
                print(f"server ready after {ready:.1f} s", file=sys.stderr, flush=True)
            async with client.get(args.url + "/v1/models") as resp:
                models = await resp.json()
            args.model = args.model or models["data"][0]["id"]
            out = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                   "label": args.label or args.launch or args.url,
                   "launch": args.launch, "url": args.url, "model": args.model, "models_endpoint": models,
                   "settings": {k: getattr(args, k) for k in ("duration", "rounds", "max_tokens", "temperature",
                                                              "max_requests", "request_timeout", "warmup",
                                                              "concurrency")},
                   "client_loop": LOOP,
                   "prompts": prompts, "server_ready_s": round(ready, 1) if proc else None}  # fmt: skip
            warm = [await one_request(client, args.url + "/v1/chat/completions", request_body(args, prompts[i]), i)
                    for i in range(min(args.warmup, len(prompts)))]  # fmt: skip
            for w in warm:
                if not w.ok:
                    print(f"warm-up request failed: {w.error}", file=sys.stderr)
            out["samples"] = [{"prompt": prompts[w.prompt], "text": w.text, "tokens": w.tokens, "finish": w.finish}
                              for w in warm]  # fmt: skip
            out["levels"], out["requests"] = [], {}
            # The client's own collector pauses would read as the server's latency: what exists now stays out of
            # its sight (the results it keeps are not in cycles, so each collection stays small).
            gc.collect()
            gc.freeze()
            rounds: dict[int, list[Level]] = {c: [] for c in args.concurrency}
            for r in range(args.rounds):  # the levels in turn, `rounds` times: each level sees the machine's drift
                for c in args.concurrency:
                    rounds[c].append(await run_level(client, args, prompts, c))
                    s = summarize(rounds[c][-1:])
                    s["round"] = r + 1
                    print(json.dumps({k: v for k, v in s.items() if k != "error_messages"}), file=sys.stderr,
                          flush=True)  # fmt: skip
                    for m in s["error_messages"]:
                        print(f"  error: {m}", file=sys.stderr, flush=True)
            for c in args.concurrency:
                s = summarize(rounds[c])
                first = out["levels"][0] if out["levels"] else s
                base = first["tokens_per_s"] if first["concurrency"] == 1 else None
                s["vs_c1"] = round(s["tokens_per_s"] / base, 2) if base else None
                if base and args.rounds > 1:  # the ratio within each round (levels minutes apart drift less)
                    s["vs_c1_rounds"] = [round(x / b, 2) if b else None
                                         for x, b in zip(s["tokens_per_s_rounds"], first["tokens_per_s_rounds"])]  # fmt: skip
                out["levels"].append(s)
                out["requests"][str(c)] = [{k: v for k, v in asdict(r).items() if k != "text"}
                                           for lv in rounds[c] for r in lv.results]  # fmt: skip
            if proc is not None and proc.poll() is not None:
                out["server_exit"] = proc.returncode
    finally:
        if proc is not None:
            stop(proc)
    return out


def load_prompts(path: str) -> list[str]:
    text = Path(path).read_text("utf-8")
    prompts = json.loads(text) if path.endswith(".json") else [ln for ln in text.splitlines() if ln.strip()]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SystemExit(f"{path}: expected a JSON list of strings or one prompt per line")
    return prompts


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version()}  # fmt: skip


def fmt(x, unit: str = "") -> str:
    return "-" if x is None else f"{x:g}{unit}"


def table(run: dict) -> str:
    m, s = run["machine"], run["settings"]
    rounds = f" x {s['rounds']} rounds (levels in turn)" if s.get("rounds", 1) > 1 else ""
    lines = [
        (
            f"**{run['label']}**, model `{run['model']}`: {m['cpus']} CPUs ({m['processor'] or m['platform']}), "
            f"{run['date'][:10]}; {s['duration']} s per level{rounds}, max_tokens {s['max_tokens']}, temperature "
            f"{s['temperature']}, {len(run['prompts'])} prompts, streaming chat"
        ),
        "",
        f"`{run['command']}`",
        "",
        (
            "| clients | requests | errors | tokens/req | TTFT p50 | TTFT p99 | per-token p50 | per-token p99 | "
            "output tok/s | vs 1 client | client CPU s | load before → after |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv in run["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {fmt(lv['tokens_per_request'])} | "
            f"{fmt(lv['ttft_p50_ms'], ' ms')} | {fmt(lv['ttft_p99_ms'], ' ms')} | "
            f"{fmt(lv['per_token_p50_ms'], ' ms')} | "
            f"{fmt(lv['per_token_p99_ms'], ' ms')} | {lv['tokens_per_s']:.1f} | {fmt(lv['vs_c1'], 'x')}{spread(lv)} | "
            f"{lv['client_cpu_s']} | {lv['load_before'][0]:.2f} → {lv['load_after'][0]:.2f} |"
        )  # fmt: skip
    return "\n".join(lines)


def spread(level: dict) -> str:
    """' (lowest-highest round)' of a level's ratio to 1 client, where it ran in rounds."""
    xs = [x for x in level.get("vs_c1_rounds") or [] if x is not None]
    return f" ({min(xs)}-{max(xs)}x)" if len(xs) > 1 and set(xs) != {1.0} else ""


def ratio_table(a: dict, b: dict) -> str:
    """A's throughput and p99 latencies over B's, level by level."""
    rows = [f"**{a['label']}** vs **{b['label']}**", "",
            "| clients | tok/s A | tok/s B | A / B | TTFT p99 A / B | per-token p99 A / B |",
            "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    bl = {lv["concurrency"]: lv for lv in b["levels"]}

    def div(x, y):
        return "-" if not x or not y else f"{x / y:.2f}"

    for lv in a["levels"]:
        o = bl.get(lv["concurrency"])
        if o is not None:
            rows.append(f"| {lv['concurrency']} | {lv['tokens_per_s']:.1f} | {o['tokens_per_s']:.1f} | "
                        f"{div(lv['tokens_per_s'], o['tokens_per_s'])} | {div(lv['ttft_p99_ms'], o['ttft_p99_ms'])} | "
                        f"{div(lv['per_token_p99_ms'], o['per_token_p99_ms'])} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (no /v1)")
    p.add_argument("--model", default="", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")],
                   help="client counts, one level each (comma-separated)")  # fmt: skip
    p.add_argument("--duration", type=float, default=30, help="seconds per level in which requests are started")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the levels in turn this many times (each round --duration per level); a level's figures "
                        "are over all its rounds")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompt-set", default="", help="a JSON list or a file of one prompt per line (default: 8 here)")
    p.add_argument("--max-requests", type=int, default=100_000, help="cap on requests per level")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds before a request counts as an error")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the first level (texts kept)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--json", default="", help="write every result (per level and per request) here")
    p.add_argument("--label", default="", help="the name in the tables (default: the launch command or the URL)")
    p.add_argument("--launch", default="", help="a server command to start (and stop at the end)")
    p.add_argument(
        "--server-log",
        default=os.path.join(tempfile.gettempdir(), "serve_load_server.log"),
        help="where a launched server's output goes (default: serve_load_server.log in the temp folder)",
    )
    p.add_argument("--launch-timeout", type=float, default=600, help="seconds to wait for a launched server's /health")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="only print the tables of saved runs (and the first one's ratios to each other)")  # fmt: skip
    args = p.parse_args(argv)
    if args.report:
        runs = [json.loads(Path(f).read_text()) for f in args.report]
        print("\n\n".join([table(r) for r in runs] + [ratio_table(runs[0], r) for r in runs[1:]]))
        return 0
    args.url = args.url.rstrip("/")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    out = RUN(bench(args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
