"""The thread-pool machinery both dataset writers share: queued write jobs, backpressure, the first failure
re-raised in the caller, and a context manager that drains and closes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any


class BackgroundWriter:
    """Base of the output layouts' writers (`dataset.layout_writer.LayoutWriter`).

    Subclasses queue jobs with `_start` (tracked: `drain` waits for them, their first failure is raised by the
    next `_check_open`, `drain` or `close`) after taking a slot with `_slots.acquire()` (at most 2·workers + 4
    jobs in flight; the job releases it), and release their files in `_release`, called once by `close`.
    """

    def __init__(self, workers: int, thread_name: str) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(2 * workers + 4)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name)
        self._pending: set[Future[Any]] = set()
        self._failure: BaseException | None = None
        self._closed = False

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            self.close()
        except BaseException as close_error:
            if close_error is not exc:  # a failure already propagating is not raised twice
                raise

    def _check_open(self) -> None:
        """Raise a queued job's failure, or RuntimeError once closed."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("the writer is closed")

    def _start(self, job: Callable[..., Any], *args: Any) -> None:
        """Run `job(*args)` on the pool as a tracked job."""
        future = self._pool.submit(job, *args)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._finished)

    def drain(self) -> None:
        """Wait for every queued job; raise the first failure, if any."""
        with self._lock:
            pending = list(self._pending)
        wait(pending)
        self._raise_if_failed()

    def close(self) -> None:
        """Drain, stop the workers and release the files (`_release`); raise the first failure, if any."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
            if self._failure is None and not future.cancelled() and future.exception() is not None:
                self._failure = future.exception()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure
