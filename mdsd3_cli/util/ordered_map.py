"""Ordered, bounded parallel map on threads (for I/O, hashing and decoding, which release the GIL)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int, name: str = "mdsd3-io") -> Iterator[R]:
    """`function(item)` for each item on `workers` threads, in input order, with at most 4 x workers in flight.

    Closing the generator early cancels what has not started and waits for what has.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    remaining = iter(items)
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        try:
            while True:
                for item in itertools.islice(remaining, 4 * workers - len(pending)):
                    pending.append(pool.submit(function, item))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
