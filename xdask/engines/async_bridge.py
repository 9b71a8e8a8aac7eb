"""``AsyncLoopThread``: a private asyncio loop in a thread of its own, for async engines.

Why: SGLang's ``Engine.async_generate`` and vLLM's ``AsyncLLM`` are asyncio
APIs whose sockets, tasks and request state belong to the one event loop
that first drove them, while xdask calls an engine from many worker
threads, one per in-flight request. No loop of the caller may be used: the
Dask worker's loop runs heartbeats and comms (FACTS.md: an ``async`` method
that blocks stalls the whole worker), and the caller threads have none. So
an async engine gets a loop of its own, running forever in a daemon thread;
caller threads submit coroutines to it and get ``concurrent.futures``
futures back (or, for streams, pass a thread-safe queue into the coroutine).
The engine object itself should be created *inside* that loop (``call``),
so that whatever it binds to "the current loop" is this one.

``stop`` cancels whatever is still running there, waits for it to finish
cancelling, and joins the thread; a future whose coroutine did not finish
in time fails with ``RuntimeError`` instead of hanging its caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class AsyncLoopThread:
    """An asyncio event loop running in a daemon thread, driven from any thread.

    Parameters
    ----------
    name
        The thread's name (shows in stack dumps and ``threading.enumerate()``).

    Examples
    --------
    >>> import asyncio
    >>> bridge = AsyncLoopThread("example")
    >>> bridge.start()
    >>> async def add(a, b):
    ...     await asyncio.sleep(0)
    ...     return a + b
    >>> bridge.run(add(1, 2)).result(timeout=5)
    3
    >>> bridge.call(sorted, [3, 1, 2]).result(timeout=5)
    [1, 2, 3]
    >>> bridge.stop()
    """

    def __init__(self, name: str = "xdask-async-loop"):
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Guards the started/stopping state against run() racing stop(): a
        # coroutine is either scheduled before the loop is told to stop (and
        # is then cancelled by it) or refused.
        self._lock = threading.Lock()
        self._stopping = False
        self._pending: set[concurrent.futures.Future[Any]] = set()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Create the loop and start its thread; returns once the loop runs."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"{self.name}: already started")
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(target=self._main, args=(loop, ready), name=self.name, daemon=True)
            self._loop, self._thread = loop, thread
            thread.start()
        ready.wait()

    def _main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception as exc:  # an async generator that fails to close must not keep the loop open
                logger.debug("%s: closing async generators failed: %s", self.name, exc)
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread.

        Waits up to ``timeout`` seconds for cancelled work to wind down.
        Idempotent; must not be called from the loop's own thread (it would
        wait for itself).
        """
        if self.in_loop_thread():
            raise RuntimeError(f"{self.name}: stop() called from the loop's own thread")
        with self._lock:
            loop, thread = self._loop, self._thread
            first = not self._stopping
            self._stopping = True
        if loop is None or thread is None:
            return
        if first and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._cancel_all(timeout), loop).result(timeout + 5)
            except Exception as exc:  # the loop died or is wedged: still stop it below
                logger.warning("%s: cancelling pending work failed: %r", self.name, exc)
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout + 5)
        if thread.is_alive():
            logger.warning("%s: the loop thread did not end within %.0f s", self.name, timeout + 5)
        # Futures whose coroutines never finished (stuck in a blocking call,
        # or cancelled before they started) would otherwise leave their
        # callers waiting forever.
        with self._lock:
            leftovers, self._pending = list(self._pending), set()
        for fut in leftovers:
            if not fut.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    fut.set_exception(RuntimeError(f"{self.name}: the event loop stopped before this finished"))

    async def _cancel_all(self, timeout: float) -> None:
        me = asyncio.current_task()
        deadline = asyncio.get_running_loop().time() + timeout
        # A few rounds: cancelled work may start new tasks while it winds down.
        for _ in range(3):
            tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not tasks:
                return
            for task in tasks:
                task.cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            _, still = await asyncio.wait(tasks, timeout=left)
            if still:
                break
        stuck = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if stuck:
            logger.warning("%s: %d task(s) did not finish cancelling within %.0f s", self.name, len(stuck), timeout)

    # -- state -------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The private loop (only for ``call_soon_threadsafe``-style use from other threads)."""
        if self._loop is None:
            raise RuntimeError(f"{self.name}: not started")
        return self._loop

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._loop is not None and not self._stopping and self._loop.is_running()

    def in_loop_thread(self) -> bool:
        """True when called from the loop's own thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    # -- submitting work -----------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; its result or exception comes back in the future.

        Cancelling the returned future cancels the coroutine. Raises
        ``RuntimeError`` (and closes ``coro``) when the loop is not running.
        """
        with self._lock:
            loop = self._loop
            if loop is None or self._stopping or loop.is_closed():
                coro.close()  # never awaited: close it so Python does not warn
                raise RuntimeError(f"{self.name}: the event loop is not running")
            fut = asyncio.run_coroutine_threadsafe(coro, loop)
            self._pending.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run the plain function ``fn(*args, **kwargs)`` on the loop's thread.

        For objects that must be created or touched where the loop runs (an
        async engine's constructor, its abort call); ``fn`` blocks the loop
        while it runs.
        """

        async def invoke() -> T:
            return fn(*args, **kwargs)

        return self.run(invoke())

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Fire-and-forget ``fn(*args)`` on the loop's thread; raises ``RuntimeError`` if stopped."""
        with self._lock:
            loop = self._loop
            if loop is None or self._stopping or loop.is_closed():
                raise RuntimeError(f"{self.name}: the event loop is not running")
            loop.call_soon_threadsafe(fn, *args)
