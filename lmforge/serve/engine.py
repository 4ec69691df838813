"""Continuous batching: one loop that admits requests into the running decode batch between steps.

    engine = Engine(model, max_batch=16, max_context=1024)
    engine.start()                                    # the loop runs in its own thread
    req = Request(prompt_ids, Sampling(max_tokens=64, temperature=0), on_event=print)
    engine.submit(req)                                # raises QueueFull when the queue is full
    engine.cancel(req)                                # its slot is freed at the next step

The server (`lmforge serve`, lmforge/serve/api.py) is its only user, by default stepping it in a process of its own
(lmforge/serve/engine_process.py, which calls `step()` itself); the tests drive `step()` directly.

The KV cache is `max_batch` fixed slots of `max_context` positions each (`SlotCache`), allocated once.
The packed step (below) names each token's slot, so a request takes any free slot and leaves it as it is. Elsewhere
running requests always hold slots 0..n-1: a finished request's slot is filled by the last one's (its
keys and values copied, only as far as it has them), so a decode step is one forward over rows 0..n-1
with each row's own length (`Transformer._attn_mask` with a per-row start: a row sees only its own
keys, at its own positions). Each step:
  1. drops cancelled requests (a disconnected client) and admits waiting ones into free slots, as many as
     this step's prefill budget covers (at least one);
  2. prefills admitted prompts, at most `prefill_chunk` tokens in all per step, so a long prompt is
     spread over several steps and the running rows wait at most one chunk for their next token
     (chunked prefill, as in Sarathi-Serve; Agrawal et al. 2024); prompts in consecutive slots (those
     admitted together) run in one right-padded forward, and a prompt whose start is in the prefix
     cache (`PrefixCache`) prefills only the rest;
  3. runs one decode step for every row whose prompt is in, samples each row with its own settings
     and generator, and retires rows that hit a stop token, a stop string, max_tokens or the context.
Where the fused decode step and lmforge's C attention kernel run (CPU, float32, no ALiBi), steps 2 and 3 are
one pass (`_packed_step`, `FusedDecoder.packed`): the decode rows' next tokens and the prompt chunks go
through every matrix product together, each token writing its key and value at its own slot and position
and attending to its own slot only, so the weights are read once per step (as vLLM's chunked prefill
mixes prefill and decode in one batch). Elsewhere the prefill is its own forward (prompts in consecutive
slots right-padded into one), and a row still being prefilled rides along in the decode forward (its
output is ignored and the key it writes is overwritten by its next chunk), which keeps the batch contiguous.

A request alone gives the same tokens as `lmforge generate` with the same seed and settings (greedy:
identical tokens, tests/test_serve_engine.py), batched or not, up to float rounding in batched matmuls.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels
from lmforge.model.quant import is_quantized, weight_bytes
from lmforge.model.transformer import Transformer
from lmforge.serve.generate import FusedDecoder
from lmforge.serve.kv_slots import PrefixCache, SlotCache
from lmforge.serve.sampling import apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p


class QueueFull(Exception):
    """The engine's waiting queue is full: the server answers 429 at once."""


@dataclass
class Sampling:
    """One request's generation settings (the OpenAI API's names; top_k and repetition_penalty as in HF)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely


@dataclass(eq=False)  # a request is itself: compared (list.remove, `in`) by identity
class Request:
    """A prompt and its settings; `on_event(token_id, logprobs, finish_reason)` is called from the engine thread.

    Each new token comes with finish_reason None (logprobs: (chosen logprob, [(id, logprob)] top k) or None);
    the last call has token_id None and finish_reason "stop", "length" or "cancelled". `stop_check(token_id)`
    (optional) returns True to end the request after that token (a stop string in the text).
    """

    prompt: list[int]
    sampling: Sampling
    on_event: Callable[[int | None, tuple | None, str | None], None]
    stop_check: Callable[[int], bool] | None = None
    # engine state
    slot: int = -1
    seq: int = 0  # admission order
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed back
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # token counts for presence/frequency penalties (output only)
    seen: torch.Tensor | None = None  # prompt + output tokens, for repetition_penalty (HF counts the prompt)
    rid: int = -1  # its id between the server and an engine in another process (lmforge/serve/engine_process.py)


def check_request(req: Request, max_context: int, vocab_size: int) -> None:
    """LmforgeError for a request no engine of this context and vocabulary can run."""
    if not req.prompt:
        raise LmforgeError("the prompt is empty")
    if len(req.prompt) + req.sampling.max_tokens > max_context:
        raise LmforgeError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.sampling.max_tokens}) exceeds the "
                           f"context ({max_context})")  # fmt: skip
    if min(req.prompt) < 0 or max(req.prompt) >= vocab_size:
        raise LmforgeError(f"prompt token ids must be in 0..{vocab_size - 1}")


class Engine:
    """The continuous-batching loop over a model (see the module docstring)."""

    def __init__(self, model: Transformer, *, max_batch: int = 16, max_context: int | None = None,
                 prefill_chunk: int = 256, max_queue: int = 256, prefix_cache: int = 4096,
                 fused: bool = True, packed: bool = True):  # fmt: skip
        max_context = max_context or model.cfg.max_seq_len
        if not 1 <= max_context <= model.cfg.max_seq_len:
            raise LmforgeError(f"--max-context ({max_context}) must be in 1..{model.cfg.max_seq_len} (the model's)")
        if max_batch < 1 or prefill_chunk < 1 or max_queue < 0:
            raise LmforgeError("--max-batch and the prefill chunk must be at least 1, the queue at least 0")
        self.model = model.eval()
        self.max_batch, self.max_context, self.prefill_chunk, self.max_queue = (
            max_batch, max_context, prefill_chunk, max_queue)  # fmt: skip
        self.cache = SlotCache(model, max_batch, max_context)
        self.prefixes = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        self.device = next(model.parameters()).device
        use_fused = fused and self.device.type == "cpu" and FusedDecoder.supports(model)
        self.decoder = FusedDecoder(model, max_batch) if use_fused else None
        # A single running request decodes ~30% faster with the weights in the batch-1 layout (SmolLM2-135M: 52 vs
        # 68 ms a token); that is a second copy of the projections, kept only when it is small. Quantized weights
        # run the same kernels at any batch: no second layout.
        small = weight_bytes(model) <= 1 << 30 and not is_quantized(model)
        self.decoder1 = FusedDecoder(model, 1) if use_fused and max_batch > 1 and small else None
        # One pass per step for decode rows and prompt chunks together where the C attention kernel runs (the rest:
        # a prefill forward, then a decode step)
        self.packed = packed and self.decoder is not None and self.decoder.supports_packed()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # running[i] holds slot i (packed: any slot, from `free`)
        self.free = list(range(max_batch))  # the packed step's free slots, a heap (lowest first)
        self.admitted = itertools.count()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.error: BaseException | None = None
        self.stats = collections.Counter()  # steps, decode_rows, prefill_tokens, generated
        self.on_step: Callable[[int, float], None] | None = None  # (batch rows, seconds): the server's metrics

    # ------------------------------------------------------------------ outside API (any thread)

    def submit(self, req: Request) -> None:
        if self.error is not None or self.stopping:
            raise LmforgeError("the engine is not running")
        check_request(req, self.max_context, self.model.cfg.vocab_size)
        s = req.sampling
        req.generator = torch.Generator(device=self.device)
        req.generator.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        with self.lock:
            if len(self.waiting) >= self.max_queue + self.max_batch - len(self.running):  # beyond the free slots
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(req)
        self.wake.set()

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away); the engine frees its slot at the next step."""
        req.cancelled = True
        self.wake.set()

    @property
    def prefix_hit_tokens(self) -> int | None:
        """Prompt tokens copied from the prefix cache so far (None: no prefix cache), for /metrics."""
        return self.prefixes.hit_tokens if self.prefixes is not None else None

    def load(self) -> dict:
        """Queue depth, running rows and free slots, for /metrics and /health."""
        with self.lock:
            return {"waiting": len(self.waiting), "running": len(self.running),
                    "free_slots": self.max_batch - len(self.running)}  # fmt: skip

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        with self.lock:
            pending = list(self.waiting) + self.running
            self.waiting.clear()
        for req in pending:
            self._finish(req, "cancelled")
        self.running = []

    def _loop(self) -> None:
        try:
            while not self.stopping:
                if not self.step():
                    self.wake.wait(timeout=0.5)
                    self.wake.clear()
        except BaseException as e:  # a bug or out of memory: fail every request instead of hanging them
            self.error = e
            with self.lock:
                pending = list(self.waiting) + self.running
                self.waiting.clear()
                self.running = []
            for req in pending:
                self._finish(req, "error")
            raise

    # ------------------------------------------------------------------ the step (engine thread)

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, prefill one chunk's worth, decode one token for every ready row. False when there was nothing."""
        t0 = time.perf_counter()
        self._retire([r for r in self.running if r.cancelled], "cancelled")
        with self.lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            # Admit only what this step's prefill budget covers (at least one request): a row admitted and not yet
            # prefilled would ride along in every decode step for nothing (a burst of 64 requests cost a 64-row
            # decode per step while they were prefilled a few at a time).
            # A prompt's cached start is copied in at admission, so the budget counts only what is left to prefill.
            budget = self.prefill_chunk - sum(len(r.prompt) - r.prefilled for r in self.running)
            while self.waiting and len(self.running) < self.max_batch:
                req = self.waiting[0]
                cached = self.prefixes.lookup(req.prompt) if self.prefixes is not None else None
                todo = len(req.prompt) - (cached[2] if cached is not None else 0)
                if todo > budget and budget < self.prefill_chunk:
                    break
                self.waiting.popleft()
                budget -= todo
                req.slot = heapq.heappop(self.free) if self.packed else len(self.running)
                req.prefilled, req.seq = 0, next(self.admitted)
                self.cache.lengths[req.slot] = 0
                if cached is not None:
                    k, v, n = cached
                    self.cache.k[:, req.slot, :, :n] = k
                    self.cache.v[:, req.slot, :, :n] = v
                    self.cache.lengths[req.slot] = req.prefilled = n
                self.running.append(req)
        if not self.running:
            return False
        if self.packed:
            self._packed_step()
        else:
            self._prefill()
            if any(r.next_token is not None for r in self.running):
                self._decode()
        self.stats["steps"] += 1
        if self.on_step is not None:
            self.on_step(len(self.running), time.perf_counter() - t0)
        return True

    def _packed_step(self) -> None:
        """Decode every ready row and prefill up to `prefill_chunk` prompt tokens in one pass (`FusedDecoder.packed`):
        each matrix product reads its weights once for both, where the two-forward step read them twice (a SmolLM2
        step is bound by that) and ran the prefill through the model's unfused forward (most of a tiny model's step)."""
        ready = [r for r in self.running if r.next_token is not None]
        work = self._prefill_work()
        lengths = self.cache.lengths
        tok = [r.next_token for r in ready]
        slots = [r.slot for r in ready]
        pos = [lengths[s] for s in slots]
        for s in slots:
            lengths[s] += 1
        logits_at, finished = list(range(len(ready))), []
        for req, chunk in work:
            tok += chunk
            slots += [req.slot] * len(chunk)
            pos += range(req.prefilled, req.prefilled + len(chunk))
            req.prefilled += len(chunk)
            self.cache.lengths[req.slot] = req.prefilled
            if req.prefilled == len(req.prompt):
                logits_at.append(len(tok) - 1)
                finished.append(req)
        dev = self.device
        decoder = self.decoder1 if len(tok) == 1 and self.decoder1 is not None else self.decoder
        rows = torch.tensor([tok, slots, pos], device=dev)  # one conversion for the three
        # every token's logits (a step of decode rows and finished prompts only): no gather of them
        at = None if len(logits_at) == len(tok) else torch.tensor(logits_at, dtype=torch.long, device=dev)
        logits = decoder.packed(rows[0], rows[1], rows[2], self.cache.k, self.cache.v, at)
        for r in ready:
            r.next_token = None
        self.stats["decode_rows"] += len(ready)
        self.stats["prefill_tokens"] += len(tok) - len(ready)
        for req in finished:
            if self.prefixes is not None:
                self.prefixes.store(req.prompt, self.cache, req.slot)
            self._start_penalties(req)
        self._emit(ready + finished, logits)

    def _prefill_work(self) -> list[tuple[Request, list[int]]]:
        """The prompt chunks this step prefills, at most `prefill_chunk` tokens in all, oldest admission first (slots
        get reordered as requests retire), returned in slot order."""
        budget, work = self.prefill_chunk, []
        for req in sorted((r for r in self.running if r.prefilled < len(r.prompt)), key=lambda r: r.seq):
            if budget == 0:
                break
            chunk = req.prompt[req.prefilled : req.prefilled + budget]
            budget -= len(chunk)
            work.append((req, chunk))
        return sorted(work, key=lambda w: w[0].slot)

    def _prefill(self) -> None:
        """Prefill this step's prompt chunks (no packed step): prompts in consecutive slots in one forward each run."""
        work = self._prefill_work()
        runs = [[work[0]]] if work else []
        for w in work[1:]:
            if w[0].slot == runs[-1][-1][0].slot + 1:
                runs[-1].append(w)
            else:
                runs.append([w])
        finished, logits = [], []
        for run in runs:
            for (req, chunk), row in zip(run, self._prefill_run(run)):
                req.prefilled += len(chunk)
                self.stats["prefill_tokens"] += len(chunk)
                if req.prefilled == len(req.prompt):
                    finished.append(req)
                    logits.append(row)
        for req in finished:
            if self.prefixes is not None:
                self.prefixes.store(req.prompt, self.cache, req.slot)
            self._start_penalties(req)
        if finished:
            self._emit(finished, torch.stack(logits))

    def _prefill_run(self, run: list[tuple[Request, list[int]]]) -> torch.Tensor:
        """Last-position logits (len(run), V) of each chunk; writes their keys/values and advances the lengths."""
        first, n, T = run[0][0].slot, len(run), max(len(c) for _, c in run)
        starts = self.cache.lengths[first : first + n]
        if n == 1 or max(starts) + T > self.max_context:  # alone (a padded row must not pass its slot's end)
            out = []
            for req, chunk in run:
                view = self.cache.slot(req.slot)
                out.append(self.model(torch.tensor([chunk], device=self.device), cache=view, last_only=True)[0][0, -1])
                self.cache.lengths[req.slot] = view.length
            return torch.stack(out)
        ids = torch.zeros(n, T, dtype=torch.long, device=self.device)  # right-padded: padding comes after each chunk
        for i, (_, chunk) in enumerate(run):
            ids[i, : len(chunk)] = torch.tensor(chunk)
        lens = torch.tensor([len(c) for _, c in run], device=self.device)
        view = self.cache.rows(n, first, T)
        last = self.model.cfg.max_seq_len - 1
        positions = (view.length[:, None] + torch.arange(T, device=self.device)).clamp(max=last)
        hidden = self.model(ids, cache=view, positions=positions, return_hidden=True)[0]
        for i, (_, chunk) in enumerate(run):
            self.cache.lengths[first + i] += len(chunk)
        return self.model.lm_head(hidden[torch.arange(n, device=self.device), lens - 1])

    def _decode(self) -> None:
        n = len(self.running)
        tok = torch.tensor([r.next_token if r.next_token is not None else 0 for r in self.running], device=self.device)
        rows = self.cache.rows(n)
        if self.decoder is not None:
            logits = (self.decoder1 if n == 1 and self.decoder1 is not None else self.decoder)(tok, rows)
        else:
            logits = self.model(tok[:, None], cache=rows, positions=rows.length[:, None])[0][:, -1]
        ready = []
        for i, req in enumerate(self.running):
            if req.next_token is not None:  # a row mid-prefill rode along: its length stays, its output is dropped
                self.cache.lengths[i] += 1
                req.next_token = None
                ready.append(i)
        self.stats["decode_rows"] += len(ready)
        self._emit([self.running[i] for i in ready], logits[ready])

    def _start_penalties(self, req: Request) -> None:
        s, V = req.sampling, self.model.cfg.vocab_size
        if s.presence_penalty or s.frequency_penalty:
            req.counts = torch.zeros(V, device=self.device)
        if s.repetition_penalty != 1.0:  # as generate(): the prompt counts, stop tokens are never penalized
            req.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
            req.seen[torch.tensor(req.prompt, device=self.device)] = True
            if s.stop_ids:
                req.seen[torch.tensor(list(s.stop_ids), device=self.device)] = False

    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample a token for each request from its logits row; stream it; retire the finished."""
        done: list[tuple[Request, str]] = []
        for req, t, lp in zip(reqs, *sample_rows(logits, reqs)):
            s = req.sampling
            if t in s.stop_ids:
                done.append((req, "stop"))
                continue
            req.output.append(t)
            self.stats["generated"] += 1
            if req.counts is not None:
                req.counts[t] += 1
            if req.seen is not None:
                req.seen[t] = True
            req.on_event(t, lp, None)
            length = len(req.prompt) + len(req.output)
            if req.stop_check is not None and req.stop_check(t):
                done.append((req, "stop"))
            elif len(req.output) >= s.max_tokens or length >= self.max_context:
                done.append((req, "length"))
            else:
                req.next_token = t
        for req, reason in done:
            self._retire([req], reason)

    def _retire(self, reqs: list[Request], reason: str) -> None:
        for req in reqs:
            if req.slot < 0:
                continue
            if self.packed:  # the packed step names each token's slot: any free one will do, nothing moves
                self.running.remove(req)
                heapq.heappush(self.free, req.slot)
            else:
                last = self.running[-1]
                if last is not req:
                    self.cache.move(last.slot, req.slot)
                    self.running[req.slot], last.slot = last, req.slot
                self.running.pop()
            req.slot = -1
            self._finish(req, reason)

    @staticmethod
    def _finish(req: Request, reason: str) -> None:
        if not req.finished:
            req.finished = True
            req.on_event(None, None, reason)


def _penalized(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """One row's logits after the request's repetition (HF), presence and frequency (OpenAI) penalties."""
    s = req.sampling
    if req.seen is not None:
        logits = apply_repetition_penalty(logits, req.seen, s.repetition_penalty)
    if req.counts is not None:
        logits = logits - s.frequency_penalty * req.counts - s.presence_penalty * (req.counts > 0)
    return logits


def sample_rows(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[tuple | None]]:
    """A token (and logprobs when asked) for each row, each with its request's settings and generator.

    Rows with the same temperature/top-k/top-p are processed together; every draw uses the row's own
    generator on its own (1, V) probabilities, which is what `generate` does for a single prompt, so a
    seeded request gives the same tokens alone or batched.
    """
    tokens: list[int] = [0] * len(reqs)
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(reqs):
        s = r.sampling
        groups[(s.temperature, s.top_k, s.top_p)].append(i)
    penalized = [r.seen is not None or r.counts is not None for r in reqs]
    # One setting for every row and no penalty (the common case: a step's rows all greedy): the logits as they are
    whole = len(groups) == 1 and not any(penalized)
    rows = [] if whole else [_penalized(lg, r) if p else lg for lg, r, p in zip(logits, reqs, penalized)]
    for (temperature, top_k, top_p), idx in groups.items():
        lg = logits if whole else torch.stack([rows[i] for i in idx])
        if temperature == 0:
            picked = cpu_kernels.greedy(lg).tolist()
        else:
            lg = apply_top_p(apply_top_k(apply_temperature(lg.float(), temperature), top_k or None), top_p)
            probs = lg.softmax(dim=-1)
            picked = [int(torch.multinomial(probs[j : j + 1], 1, generator=reqs[i].generator))
                      for j, i in enumerate(idx)]  # fmt: skip
        for i, t in zip(idx, picked):
            tokens[i] = int(t)
    logprobs: list[tuple | None] = [None] * len(reqs)
    for i, r in enumerate(reqs):
        k = r.sampling.logprobs
        if k is not None:  # the model's own distribution (before temperature and penalties), as vLLM reports
            lp = torch.log_softmax(logits[i].float(), dim=-1)
            top = torch.topk(lp, k) if k > 0 else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprobs[i] = (float(lp[tokens[i]]), alts)
    return tokens, logprobs
