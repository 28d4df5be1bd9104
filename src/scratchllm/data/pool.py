"""The bounded worker pool: `fn(shared, item)` over a stream of items on several cores, in order.

`Pool.imap` would not do: its feeder thread reads the whole input ahead into the task queue, so
a corpus larger than memory would not stream. Here at most `in_flight` items (2 per worker by
default) are submitted and not yet handed back, and results come back in input order. `shared`
(a tokenizer, compiled patterns) reaches each worker once, when it starts; `fn` must be a
module-level function, as it is sent with every item.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from multiprocessing.pool import AsyncResult
from typing import Any, TypeVar

from scratchllm.errors import InputError

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

_shared: Any = None  # in a worker: the `shared` object of the pool that started it
_END: Any = object()  # marks an exhausted iterator (None may be an item)


def default_workers() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _set_shared(shared: Any) -> None:
    global _shared
    _shared = shared


def _call(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(_shared, item)


def _context() -> Any:
    # fork starts a worker in milliseconds and hands it `shared` without pickling it.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def ordered_map(
    fn: Callable[[S, T], R],
    items: Iterable[T],
    shared: S,
    workers: int,
    in_flight: int | None = None,
) -> Iterator[R]:
    """`fn(shared, item)` for every item, in order, computed by `workers` processes.

    With one worker, or a single item, everything runs in this process (starting processes
    would cost more than it saves). `in_flight` (default 2 × workers) bounds the items read
    ahead of the one being handed back.
    """
    if workers < 1:
        raise InputError(f"workers {workers}: expected at least 1")
    it = iter(items)
    head = [x for x in (next(it, _END), next(it, _END)) if x is not _END]
    if workers == 1 or len(head) < 2:
        for item in chain(head, it):
            yield fn(shared, item)
        return
    limit = max(1, in_flight if in_flight is not None else 2 * workers)
    with _context().Pool(workers, initializer=_set_shared, initargs=(shared,)) as pool:
        pending: deque[AsyncResult[R]] = deque()
        for item in chain(head, it):
            pending.append(pool.apply_async(_call, (fn, item)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
