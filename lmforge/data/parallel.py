"""Ordered parallel map with bounded read-ahead, shared by `data tokenize` and `data clean`.

`Pool.imap` would read its whole input ahead of the workers (unbounded memory on a large
corpus); this keeps at most `ahead` chunks in flight and yields results in input order,
so outputs are identical whatever the number of workers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator


def ordered_map(pool, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
