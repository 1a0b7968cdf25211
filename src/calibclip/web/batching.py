"""Dynamic micro-batching of model calls for the web service.

Concurrent requests each `MicroBatcher.submit` one item; a single worker thread takes the first
waiting item, gathers whatever else arrives within ``window_ms`` (up to ``max_batch`` items) and
runs the batch function once for all of them — one encoder forward instead of one per request.
The queue is bounded: when ``max_queue`` items already wait, `submit` raises `Overloaded` at once
(the API answers 503 with ``Retry-After``) instead of letting latency grow without bound, and a
request that is not answered within ``timeout_s`` gets `Overloaded` too (its item is dropped if it
has not started).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("calibclip.web")


class Overloaded(RuntimeError):
    """The server cannot take (or finish) the request now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class BatchSettings:
    """Parameters of a `MicroBatcher` (``calibclip serve --batch-*`` flags).

    window_ms:  how long the worker waits for more requests after the first one of a batch.
    max_batch:  most items per batch (1 turns batching off: every request runs alone, serialised).
    max_queue:  most items waiting; one more is refused with `Overloaded` (503).
    timeout_s:  longest a request waits for its result before `Overloaded` (503).
    """

    window_ms: float = 5.0
    max_batch: int = 32
    max_queue: int = 256
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.window_ms < 0:
            raise ValueError(f"batch window must be >= 0 ms, got {self.window_ms}")
        if self.max_batch < 1:
            raise ValueError(f"batch size must be >= 1, got {self.max_batch}")
        if self.max_queue < 1:
            raise ValueError(f"batch queue size must be >= 1, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ValueError(f"request timeout must be > 0 s, got {self.timeout_s}")


class MicroBatcher(Generic[T, R]):
    """Runs ``fn(items) -> results`` (same length and order) on batches of concurrently submitted items.

    If ``fn`` raises for a batch, its items are retried one by one so that one bad item fails alone.

    Args:
        fn: the batch function (called from the worker thread only).
        settings: window, batch size, queue bound and timeout.
        name: name of the worker thread.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], settings: BatchSettings, name: str = "batcher"):
        self.fn = fn
        self.settings = settings
        self._queue: queue.Queue[tuple[T, Future[R]]] = queue.Queue(maxsize=settings.max_queue)
        self._closed = threading.Event()
        self._batch_s = 0.05  # running mean of one batch's duration (for Retry-After)
        self.batches = 0  # batches run
        self.items = 0  # items answered through batches
        self.submitted = 0  # items accepted into the queue
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def pending(self) -> int:
        """Items waiting in the queue (not yet taken into a batch)."""
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds after which a refused client should retry: the time to drain a full queue."""
        batches = math.ceil(self.settings.max_queue / self.settings.max_batch)
        return max(1, math.ceil(batches * self._batch_s))

    def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (re-raises what ``fn`` raised for it).

        Raises:
            Overloaded: the queue is full, the request timed out, or the batcher is closed.
        """
        if self._closed.is_set():
            raise Overloaded("the server is shutting down", 1)
        fut: Future[R] = Future()
        try:
            self._queue.put_nowait((item, fut))
        except queue.Full:
            raise Overloaded(
                f"server busy: {self.settings.max_queue} queries are already waiting; retry shortly", self.retry_after()
            ) from None
        self.submitted += 1
        try:
            return fut.result(timeout=self.settings.timeout_s)
        except FutureTimeout:
            fut.cancel()
            raise Overloaded(
                f"server busy: the query was not answered within {self.settings.timeout_s:g} s", self.retry_after()
            ) from None
        except CancelledError:
            raise Overloaded("the server is shutting down", 1) from None

    def _take(self) -> list[tuple[T, Future[R]]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.settings.window_ms / 1000
        while len(batch) < self.settings.max_batch:
            try:
                batch.append(self._queue.get_nowait())  # whatever already waits, without delay
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if self._closed.is_set():
                while True:  # cancel everything still waiting, then stop
                    for _, fut in batch:
                        if fut is not None:
                            fut.cancel()
                    try:
                        batch = [self._queue.get_nowait()]
                    except queue.Empty:
                        return
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                t0 = time.perf_counter()
                self._process(live)
                self._batch_s = 0.8 * self._batch_s + 0.2 * (time.perf_counter() - t0)
                self.batches += 1
                self.items += len(live)

    def _process(self, live: list[tuple[T, Future[R]]]) -> None:
        try:
            results = list(self.fn([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(live) == 1:
                live[0][1].set_exception(exc)
                return
            log.debug("batch of %d failed; running its items one by one", len(live), exc_info=True)
            for item, fut in live:  # only the failing item fails
                try:
                    fut.set_result(list(self.fn([item]))[0])
                except Exception as one:  # noqa: BLE001
                    fut.set_exception(one)
            return
        for (_, fut), res in zip(live, results):
            fut.set_result(res)

    def close(self) -> None:
        """Refuse new items, cancel waiting ones and stop the worker thread."""
        self._closed.set()
        try:
            self._queue.put_nowait((None, None))  # type: ignore[arg-type]  # wake the worker
        except queue.Full:
            pass
        self._thread.join(timeout=5)
