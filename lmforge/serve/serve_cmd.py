"""`lmforge serve`: an OpenAI-compatible server with continuous batching, streaming and a chat page.

    lmforge serve runs/demo/sft                         # http://127.0.0.1:8000 : the chat page
    lmforge serve models/smollm2 --port 8080 --api-key "$KEY" --max-batch 32 --max-context 2048
    lmforge serve models/smollm2 --rag runs/docs-index    # answers from the index's passages, with "sources"

Then any OpenAI client works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hello"}], stream=True)

MODEL is any lmforge run, checkpoint or imported model; its name for clients is the folder's name
(`--name` to change it). The server binds 127.0.0.1 unless `--host` says otherwise; with `--api-key`
(or the LMFORGE_API_KEY environment variable) every /v1 request needs `Authorization: Bearer KEY`.
The KV cache is `--max-batch` slots of `--max-context` tokens, allocated at start (its size is printed);
requests beyond the slots wait in a queue of `--max-queue`, and past that get 429 at once.
The engine: lmforge/serve/engine.py, stepped in a child process (lmforge/serve/engine_process.py; `--engine thread`
keeps it in this one); the HTTP API: lmforge/serve/api.py; the page: lmforge/serve/static/.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class ServeConfig:
    """`lmforge serve`: each field's comment is its help text."""

    model: str = ""  # run, checkpoint or imported model folder (also the first positional argument)
    name: str = ""  # the model name clients send ("" = the model folder's name)
    host: str = "127.0.0.1"  # address to bind (0.0.0.0 exposes the server to the network)
    port: int = 8000  # TCP port (0 = any free one, printed at start)
    api_key: str = ""  # require `Authorization: Bearer KEY` on /v1 ("" = LMFORGE_API_KEY if set, else no key)
    max_batch: int = 16  # KV-cache slots: requests decoded together
    max_context: int = 0  # tokens per slot, prompt + reply (0 = the model's max_seq_len, at most 2048)
    prefill_chunk: int = 256  # most prompt tokens prefilled per engine step (running requests wait at most that)
    max_queue: int = 256  # requests waiting for a slot before new ones get 429
    # tokens of recent prompts' starts kept to skip their prefill when a prompt begins the same way (a shared system
    # prompt, the earlier turns of a conversation); 0 = off
    prefix_cache: int = 4096
    max_body: int = 1 << 20  # largest request body in bytes (larger: 413)
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, mps
    # CPU threads for the model's math (0 = auto: all cores for a model of 32M+ parameters, all but one below)
    threads: int = 0
    log_level: str = "info"  # uvicorn's: critical, error, warning, info, debug
    # process: the model steps in a child process, so the HTTP side's Python never waits for the GIL behind it (the
    # demo model: 1.6-1.8x the requests/s at 16 clients on 2 cores); thread: in this process
    engine: str = "process"
    # a retrieval index (lmforge rag index): each chat request's last user turn gets its top passages, numbered for
    # citing; the response lists them in a "sources" field
    rag: str = ""
    rag_k: int = 4  # passages per request with --rag

    def validate(self) -> ServeConfig:
        require([
            (bool(self.model), "serve needs a model: lmforge serve RUN_OR_MODEL"),
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (self.max_batch >= 1, "max_batch must be >= 1"),
            (self.max_context >= 0, "max_context must be >= 0"),
            (self.prefill_chunk >= 1, "prefill_chunk must be >= 1"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.prefix_cache >= 0, "prefix_cache must be >= 0"),
            (self.max_body >= 1024, "max_body must be >= 1024"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.rag_k >= 1, "rag_k must be >= 1"),
            (self.engine in ("process", "thread"), "engine must be process or thread"),
        ])  # fmt: skip
        return self


def register(subparsers) -> None:
    help = "serve a model: OpenAI-compatible API (continuous batching, streaming) and a chat page"
    add_config_command(subparsers, "serve", help, ServeConfig, serve, description=__doc__, positional=("model",))


def serve(cfg: ServeConfig) -> int:
    import socket

    import uvicorn

    from lmforge.serve.api import create_app, load_served

    cfg = cfg.validate()
    engine = cfg.engine if os.name != "nt" else "thread"  # the child gets its socket through pass_fds (POSIX)
    key = cfg.api_key or os.environ.get("LMFORGE_API_KEY") or None
    served = load_served(cfg.model, name=cfg.name or None, device=cfg.device, max_batch=cfg.max_batch,
                         max_context=cfg.max_context or None, prefill_chunk=cfg.prefill_chunk,
                         max_queue=cfg.max_queue, prefix_cache=cfg.prefix_cache, api_key=key,
                         max_body=cfg.max_body, rag=cfg.rag, rag_k=cfg.rag_k, engine=engine,
                         threads=cfg.threads)  # fmt: skip
    eng, info = served.engine, served.info
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))  # bound here so port 0 can be printed before uvicorn starts
    except OSError as e:
        sock.close()
        eng.stop()
        raise LmforgeError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"lmforge serve: '{served.name}' at {url} (chat page {url}/, API {url}/v1); KV cache {eng.max_batch} "
          f"slots x {eng.max_context} tokens = {info['kv_mib']:.0f} MiB; engine in a {engine} with "
          f"{info['threads']} thread(s); {'API key required' if key else 'no API key'}",
          file=sys.stderr, flush=True)  # fmt: skip
    config = uvicorn.Config(create_app(served), log_level=cfg.log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        eng.stop()  # uvicorn ends without the app's shutdown when it never started (a port taken): the child too
    return 0
