"""Dynamic batching: concurrent calls on one model, run as one model call.

Why: an embedding or rerank model answers a batch of 32 texts in little more
than the time of one (FACTS.md: 256 short sentences encode 5x faster in
batches of 32 than one at a time), but the actor receives requests one by
one, each on its own thread. ``DynamicBatcher`` sits between those threads
and the model: a caller hands in its items and blocks; one batching thread
takes every call queued, waits up to ``wait`` seconds from the first call's
arrival for more (so requests sent together share a model call), runs the
model once over all their items (at most ``max_items``, though a single
larger call runs alone) and hands each caller its slice of the results.

A call that queued while the model was busy has already waited longer than
``wait``, so under load batches form with no added delay. The wait applies
only while calls come concurrently (the previous model call served more
than one): a client that sends one request at a time gets no added delay.

Examples
--------
>>> batcher = DynamicBatcher(lambda xs: [x * 2 for x in xs], max_items=64, wait=0.001, name="demo")
>>> batcher.submit([1, 2, 3])
[2, 4, 6]
>>> batcher.close()
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from xdask.errors import ModelNotReadyError

T = TypeVar("T")
R = TypeVar("R")


class _Call(Generic[T, R]):
    __slots__ = ("arrived", "future", "items")

    def __init__(self, items: Sequence[T]):
        self.items = items
        self.arrived = time.perf_counter()
        self.future: concurrent.futures.Future[list[R]] = concurrent.futures.Future()


class DynamicBatcher(Generic[T, R]):
    """Gather the items of concurrent ``submit`` calls into calls of ``run``.

    ``run`` takes a list of items and returns one result per item, in order;
    it runs only on the batching thread, so the model sees one caller. An
    exception from ``run`` fails every call of that batch.
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R]], *, max_items: int, wait: float, name: str):
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._run = run
        self.max_items = max_items
        self.wait = max(0.0, wait)
        self._queue: collections.deque[_Call[T, R]] = collections.deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._closed = False
        self._last_calls = 0  # calls the previous model call served: >1 means requests come concurrently
        #: Model calls made and items they carried (``describe`` shows the mean batch).
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=f"xdask-batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> list[R]:
        """Run ``items`` with whatever else is queued; blocks until their results are ready."""
        if not items:
            return []
        call: _Call[T, R] = _Call(items)
        with self._cond:
            if self._closed:
                raise ModelNotReadyError("The model is shutting down")
            self._queue.append(call)
            self._queued_items += len(items)
            self._cond.notify()
        return call.future.result()

    def stats(self) -> dict[str, Any]:
        """Counters for the engine's ``describe``."""
        return {"batches": self.batches, "batched_items": self.items,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
                "max_batch": self.max_items, "batch_wait_s": self.wait}

    def close(self) -> None:
        """Stop the batching thread after the batch it runs; queued calls fail with 503."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_items = 0
            self._cond.notify_all()
        for call in pending:
            call.future.set_exception(ModelNotReadyError("The model is shutting down"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _take(self) -> list[_Call[T, R]] | None:
        """The next batch of calls (None once closed), after waiting for late joiners."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._queue[0].arrived + (self.wait if self._last_calls > 1 or len(self._queue) > 1 else 0.0)
            while self._queued_items < self.max_items and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            while self._queue and size + len(self._queue[0].items) <= self.max_items:
                call = self._queue.popleft()
                size += len(call.items)
                batch.append(call)
            self._queued_items -= size
            self._last_calls = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            items = [item for call in batch for item in call.items]
            try:
                results = self._run(items)
                if len(results) != len(items):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                for call in batch:
                    call.future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(items)
            start = 0
            for call in batch:
                call.future.set_result(list(results[start:start + len(call.items)]))
                start += len(call.items)
