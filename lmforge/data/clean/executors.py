"""Where the per-document stage of `lmforge data clean` runs its shards: here, in forked processes, or on Ray.

    lmforge data clean --input raw/ --out clean/ --workers 2                  # local: a pool of 2 forked processes
    lmforge data clean --input raw/ --out clean/ --executor ray --workers 8   # Ray tasks (RAY_ADDRESS, if set)

    for key, result in map_shards("local", 2, fn, ((key, task) for ...)): ...

`map_shards` calls `fn(task)` for each `(key, task)` and yields `(key, result)`, with at most
`2 x workers` tasks in flight, so memory stays bounded whatever the corpus size. `fn` is a pure
function of its task (a shard's documents and the step specs): the caller commits each result, so a
task that runs twice (Ray retries a task whose worker died) changes nothing.

- `local`: with one worker, in this process; else in a pool of forked processes (they share what
  the parent loaded, e.g. the language model). Results come back in input order.
- `ray`: one Ray task per shard, on a local Ray instance started here with `num_cpus=workers` (shut
  down at the end), or on the cluster at `RAY_ADDRESS` when that is set (then `workers` only bounds
  the tasks in flight), or on the instance this process has already joined. Results come back as
  they finish. Workers import lmforge themselves, so it must be installed where they run.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
from collections.abc import Callable, Iterable, Iterator

from lmforge.data.parallel import closing_pool, make_pool, ordered_map
from lmforge.errors import LmforgeError

EXECUTORS = ("local", "ray")


def check_executor(name: str) -> None:
    """An `LmforgeError` unless `name` is an executor that can run here (for `ray`: the package is installed)."""
    if name not in EXECUTORS:
        raise LmforgeError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    if name == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise LmforgeError("--executor ray needs the ray package: pip install 'lmforge[ray]' (or pip install ray)")


def map_shards(executor: str, workers: int, fn: Callable, items: Iterable[tuple]) -> Iterator[tuple]:
    """`(key, fn(task))` for each `(key, task)` of `items` (see the module docstring)."""
    check_executor(executor)
    items = iter(items)
    first = next(items, None)
    if first is None:  # every shard was done by an earlier run: start no pool, no Ray
        return
    items = itertools.chain([first], items)
    if executor == "ray":
        yield from _ray_map(fn, items, workers)
    elif workers == 1:
        for key, task in items:
            yield key, fn(task)
    else:
        yield from _pool_map(fn, items, workers)


def _pool_map(fn: Callable, items: Iterable[tuple], workers: int) -> Iterator[tuple]:
    keys: collections.deque = collections.deque()

    def tasks():
        for key, task in items:
            keys.append(key)
            yield task

    with closing_pool(make_pool(workers)) as pool:
        for result in ordered_map(pool, fn, tasks(), ahead=2 * workers):
            yield keys.popleft(), result


def _ray_map(fn: Callable, items: Iterable[tuple], workers: int) -> Iterator[tuple]:
    import ray

    started = not ray.is_initialized()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if started:
        address = os.environ.get("RAY_ADDRESS")
        try:
            if address:
                ray.init(address=address)
            else:
                ray.init(num_cpus=workers, include_dashboard=False)
        except (ConnectionError, RuntimeError) as e:
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
            first = (str(e).strip().splitlines() or [""])[0]
            raise LmforgeError(f"cannot start or join {where} ({type(e).__name__}: {first})") from None
    pending: dict = {}  # ObjectRef -> key
    try:
        remote = ray.remote(num_cpus=1)(fn)

        def finished(wait_for_all: bool) -> Iterator[tuple]:
            while pending and (wait_for_all or len(pending) >= 2 * workers):
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(ref), ray.get(ref)

        for key, task in items:
            pending[remote.remote(task)] = key
            yield from finished(False)
        yield from finished(True)
    finally:
        for ref in pending:  # stopped early (an error here): the results would be thrown away
            ray.cancel(ref)
        if started:
            ray.shutdown()
            # ray.init installs its own SIGTERM handler in this process and leaves it there after shutdown;
            # process pools forked later inherit it and then never die on Pool.terminate (seen in the tests).
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
