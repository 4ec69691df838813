"""Ordered parallel map with bounded read-ahead, shared by `data tokenize` and `data clean`.

`Pool.imap` would read its whole input ahead of the workers (unbounded memory on a large
corpus); this keeps at most `ahead` chunks in flight and yields results in input order,
so outputs are identical whatever the number of workers. `make_pool` and `closing_pool` give
the worker pools both use: forked, and shut down without relying on signals when all went well.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterable, Iterator


def _worker_init(initializer: Callable | None, initargs: tuple) -> None:
    # A forked worker inherits the parent's Python signal handlers and signal mask. Under a parent that
    # turned SIGTERM into a flag (a training loop, a test runner) or blocked it, the SIGTERM that
    # Pool.terminate sends never ends the worker, and the pool's join waits forever (seen in the test
    # suite). Workers take the default: die on SIGTERM/SIGINT.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    if initializer is not None:
        initializer(*initargs)


def make_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """A process pool, forked where the OS can (so scripts without a `__main__` guard work)."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    return ctx.Pool(workers, initializer=_worker_init, initargs=(initializer, initargs))


@contextlib.contextmanager
def closing_pool(pool):
    """Use `pool`; then close and join it (workers exit on their own), or terminate it on an error or early exit."""
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def ordered_map(pool, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
