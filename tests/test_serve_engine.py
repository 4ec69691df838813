"""The continuous-batching engine without HTTP: `python -m pytest -q tests/test_serve_engine.py`.

Requests admitted mid-flight, prefilled in chunks and retired out of order give the tokens
`generate` gives each prompt alone; a cancelled request frees its slot; a full queue refuses at once.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels
from lmforge.serve.engine import Engine, QueueFull, Request, Sampling
from lmforge.serve.generate import generate
from tests.test_generate import PROMPTS, VARIANTS, tiny, variant

MORE = PROMPTS + [list(range(1, 30)), [50], [9, 8, 7, 6]]


class Sink:
    """Collects one request's events."""

    def __init__(self):
        self.tokens, self.logprobs, self.finish = [], [], None

    def __call__(self, token, lp, finish):
        if token is None:
            self.finish = finish
        else:
            self.tokens.append(token)
            self.logprobs.append(lp)


def run(engine, reqs, stagger=0):
    """Submit the requests (every `stagger` steps a new one, 0 = all at once) and step until all are done."""
    pending = list(reqs)
    while pending and not stagger:
        engine.submit(pending.pop(0))
    steps = 0
    while pending or engine.running or engine.waiting:
        if pending and steps % stagger == 0:
            engine.submit(pending.pop(0))
        engine.step()
        steps += 1
        assert steps < 10_000


def request(prompt, sink=None, **sampling):
    return Request(prompt, Sampling(**sampling), sink or Sink())


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi", "sinusoidal"])
@pytest.mark.parametrize("mode", ["packed", "fused", "unfused"])
def test_greedy_equals_generate_alone_when_batched_chunked_and_admitted_midway(pos, mode):
    """packed: decode rows and prompt chunks in one pass (the default where the C kernels run; ALiBi falls back to
    the next); fused: a prefill forward, then the fused decode step; unfused: the model's own forward for both."""
    model = tiny(pos)
    for max_batch, chunk, stagger in ((2, 4, 0), (3, 5, 3), (8, 256, 1)):
        engine = Engine(model, max_batch=max_batch, max_context=64, prefill_chunk=chunk, fused=mode != "unfused",
                        packed=mode == "packed")  # fmt: skip
        if mode == "packed" and cpu_kernels.loaded() is not None:
            assert engine.packed == (pos != "alibi")
        reqs = [request(p, max_tokens=10 + i, temperature=0) for i, p in enumerate(MORE)]
        run(engine, reqs, stagger)
        for i, (p, r) in enumerate(zip(MORE, reqs)):
            assert r.on_event.tokens == generate(model, [p], 10 + i, temperature=0)[0], (max_batch, chunk, i)
            assert r.on_event.finish == "length"
        assert engine.load() == {"waiting": 0, "running": 0, "free_slots": max_batch}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_variants_decode_the_same_in_the_engine(name):
    model = variant(**VARIANTS[name])
    engine = Engine(model, max_batch=3, max_context=64, prefill_chunk=3)
    reqs = [request(p, max_tokens=8, temperature=0) for p in MORE]
    run(engine, reqs, stagger=2)
    assert [r.on_event.tokens for r in reqs] == [generate(model, [p], 8, temperature=0)[0] for p in MORE]


def test_seeded_sampling_and_penalties_equal_generate_batched_or_not():
    model = tiny()
    settings = [
        {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 3},
        {"temperature": 1.3, "seed": 11},
        {"temperature": 0.7, "top_k": 5, "seed": 5, "repetition_penalty": 1.3},
        {"temperature": 0, "repetition_penalty": 1.5},
    ]
    engine = Engine(model, max_batch=4, max_context=64, prefill_chunk=4)
    reqs = [request(MORE[i], max_tokens=15, **s) for i, s in enumerate(settings)]
    run(engine, reqs, stagger=2)
    for i, (s, r) in enumerate(zip(settings, reqs)):
        g = dict(s, top_k=s.get("top_k") or None)
        assert r.on_event.tokens == generate(model, [MORE[i]], 15, **g)[0], s


def test_presence_and_frequency_penalties_push_repeated_tokens_down():
    model = tiny()
    plain, penalized = Sink(), Sink()
    engine = Engine(model, max_batch=2, max_context=64)
    run(engine, [request(MORE[3], plain, max_tokens=30, temperature=0),
                 request(MORE[3], penalized, max_tokens=30, temperature=0, frequency_penalty=2.0,
                         presence_penalty=2.0)])  # fmt: skip
    assert len(set(penalized.tokens)) > len(set(plain.tokens))


def test_stop_ids_end_a_request_and_are_not_emitted():
    model = tiny()
    free = generate(model, [MORE[0]], 20, temperature=0)[0]
    stop = free[5]
    engine = Engine(model, max_batch=2, max_context=64)
    r = request(MORE[0], max_tokens=20, temperature=0, stop_ids=(stop,))
    run(engine, [r])
    assert r.on_event.tokens == free[: free.index(stop)] and r.on_event.finish == "stop"


def test_stop_check_ends_after_that_token():
    model = tiny()
    sink = Sink()
    r = Request(MORE[1], Sampling(max_tokens=20, temperature=0), sink, stop_check=lambda t: len(sink.tokens) == 4)
    run(Engine(model, max_batch=2, max_context=64), [r])
    assert len(sink.tokens) == 4 and sink.finish == "stop"


def test_logprobs_are_the_models_distribution():
    model = tiny()
    r = request(MORE[0], max_tokens=6, temperature=0, logprobs=3)
    run(Engine(model, max_batch=2, max_context=64), [r])
    seq = list(MORE[0])
    for t, (lp, top) in zip(r.on_event.tokens, r.on_event.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([seq]))[0][0, -1], -1)
        assert abs(lp - float(ref[t])) < 1e-4
        assert [i for i, _ in top] == ref.topk(3).indices.tolist() and top[0][0] == t  # greedy: the top one
        seq.append(t)


def test_cancel_frees_the_slot_and_the_others_go_on():
    model = tiny()
    engine = Engine(model, max_batch=2, max_context=64)
    a, b = request(MORE[0], max_tokens=40, temperature=0), request(MORE[1], max_tokens=40, temperature=0)
    engine.submit(a)
    engine.submit(b)
    for _ in range(3):
        engine.step()
    engine.cancel(a)
    engine.step()
    assert a.on_event.finish == "cancelled" and engine.load()["running"] == 1
    while engine.step():
        pass
    assert b.on_event.tokens == generate(model, [MORE[1]], 40, temperature=0)[0]
    assert engine.load() == {"waiting": 0, "running": 0, "free_slots": 2}


def test_full_queue_refuses_at_once_and_bad_requests_are_errors():
    model = tiny()
    engine = Engine(model, max_batch=1, max_context=64, max_queue=2)
    for _ in range(3):  # one for the free slot, two for the queue
        engine.submit(request(MORE[0], max_tokens=5))
    with pytest.raises(QueueFull):
        engine.submit(request(MORE[0], max_tokens=5))
    engine.step()  # one takes the slot, two wait: still full
    with pytest.raises(QueueFull):
        engine.submit(request(MORE[0], max_tokens=5))
    while engine.waiting:
        engine.step()
    engine.submit(request(MORE[0], max_tokens=5))  # room again
    with pytest.raises(LmforgeError, match="exceeds the context"):
        engine.submit(request(MORE[0], max_tokens=60))
    with pytest.raises(LmforgeError, match="token ids"):
        engine.submit(request([5, 1000], max_tokens=5))
    with pytest.raises(LmforgeError, match="max-context"):
        Engine(model, max_context=65)


def test_the_engine_thread_serves_concurrent_submitters():
    model = tiny()
    engine = Engine(model, max_batch=3, max_context=64, prefill_chunk=4)
    engine.start()
    try:
        reqs = [request(p, max_tokens=12, temperature=0) for p in MORE]
        threads = [threading.Thread(target=engine.submit, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while any(r.on_event.finish is None for r in reqs) and time.time() < deadline:
            time.sleep(0.01)
        assert [r.on_event.tokens for r in reqs] == [generate(model, [p], 12, temperature=0)[0] for p in MORE]
    finally:
        engine.stop()
    with pytest.raises(LmforgeError, match="not running"):
        engine.submit(request(MORE[0], max_tokens=5))


def test_a_cached_prompt_start_is_reused_and_gives_the_same_tokens():
    model = tiny()
    system = list(range(3, 40))  # a 37-token "system prompt"
    prompts = [system + [50, 51], system + [60], system[:20] + [70, 71, 72], [9] + system, system + [60]]
    engine = Engine(model, max_batch=2, max_context=64, prefill_chunk=8)
    reqs = [request(p, max_tokens=10, temperature=0) for p in prompts]
    run(engine, reqs, stagger=4)
    assert [r.on_event.tokens for r in reqs] == [generate(model, [p], 10, temperature=0)[0] for p in prompts]
    cache = engine.prefixes
    # the second prompt: the 37 it shares; the third: 20; the fourth: none; the fifth, a repeat: all but its last
    assert (cache.hits, cache.hit_tokens) == (3, 37 + 20 + 37)
    assert engine.stats["prefill_tokens"] == sum(map(len, prompts)) - 94


def test_the_prefix_cache_keeps_its_token_budget_and_a_consistent_index():
    from lmforge.serve.kv_slots import PrefixCache, SlotCache

    model = tiny()
    slots = SlotCache(model, 1, 64)
    cache = PrefixCache(max_tokens=48, block=16)
    for start in range(5):
        cache.store([start] * 40, slots, 0)  # 32 tokens each: only one fits at a time
        assert cache.tokens <= 48 and len(cache.entries) == 1
        assert all(eid in cache.entries for eid, _ in cache.index.values())
    assert cache.lookup([4] * 40)[2] == 32 and cache.lookup([0] * 40) is None
    assert cache.lookup([4] * 20)[2] == 16  # a shorter prompt finds the start it shares


def test_a_prefix_cache_hash_collision_is_a_miss():
    """The index is by hashes of the tokens; a hit is checked against the stored tokens before any keys are copied."""
    from lmforge.serve.kv_slots import PrefixCache, SlotCache

    slots = SlotCache(tiny(), 1, 64)
    cache = PrefixCache(max_tokens=64)
    cache.store([5] * 30, slots, 0)
    other = [6] * 30
    cache.index[cache._chain(other)[-1]] = next(iter(cache.index.values()))  # as if other's hash collided
    assert cache.lookup(other) is None and cache.lookup([5] * 31)[2] == 29
