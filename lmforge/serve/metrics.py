"""`GET /metrics` of `lmforge serve`: Prometheus text (prometheus_client, a registry per app).

    curl -s 127.0.0.1:8000/metrics | grep lmforge_

Counters: requests by endpoint and status, prompt and generated tokens. Gauges (read at scrape time):
waiting requests, running requests, free KV-cache slots, prompt tokens served from the prefix cache. Histograms: time to first token, time between
tokens, request latency, the engine's batch rows per step and its step time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt = Counter("lmforge_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generated = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        for name, key, doc in (("lmforge_queue_depth", "waiting", "requests waiting for a slot"),
                               ("lmforge_running_requests", "running", "requests holding a slot"),
                               ("lmforge_free_slots", "free_slots", "free KV-cache slots")):  # fmt: skip
            Gauge(name, doc, registry=r).set_function(lambda key=key: engine.load()[key])
        if engine.prefix_hit_tokens is not None:
            Gauge("lmforge_prefix_cache_hit_tokens", "prompt tokens copied from the prefix cache since the start",
                  registry=r).set_function(lambda: engine.prefix_hit_tokens)  # fmt: skip
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "request start to its first token",
                              buckets=_LATENCY, registry=r)  # fmt: skip
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_LATENCY, registry=r)  # fmt: skip
        self.latency = Histogram("lmforge_request_latency_seconds", "request start to its last byte",
                                 ["endpoint"], buckets=_LATENCY, registry=r)  # fmt: skip
        self.batch = Histogram("lmforge_batch_size", "running requests per engine step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)  # fmt: skip
        self.step = Histogram("lmforge_step_seconds", "one engine step (prefill chunk + decode)", buckets=_LATENCY,
                              registry=r)  # fmt: skip

    def on_step(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step.observe(seconds)

    def token(self, first_after: float | None, gap: float | None) -> None:
        """A generated token: seconds since the request started (its first token) or since the choice's last one."""
        self.generated.inc()
        if first_after is not None:
            self.ttft.observe(first_after)
        if gap is not None:
            self.itl.observe(gap)

    def prompt_tokens(self, n: int) -> None:
        self.prompt.inc(n)

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None and status == 200:
            self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
