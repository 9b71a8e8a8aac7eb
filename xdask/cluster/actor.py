"""``ModelActor``: one loaded model, living as a Dask actor on a worker.

The constructor loads the engine (Dask runs it in a worker thread, so the
worker's event loop stays free). Generation runs on the actor's own thread
pool, one thread per in-flight request, and is awaited from ``async def``
methods, so one actor serves many requests at once and heartbeats go on.

Tokens reach the server through the worker comm handler in
``xdask.cluster.stream`` (installed on every worker by
``xdask.cluster.worker.XdaskWorkerPlugin``) rather than one actor call per
token: see FACTS.md.

Examples
--------
>>> from distributed import Client                             # doctest: +SKIP
>>> client = Client()
>>> fut = client.submit(ModelActor, "m1", launch, actor=True, workers=[addr])
>>> actor = fut.result()
>>> actor.describe().result()["max_concurrency"]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any, cast

from distributed import get_worker

from xdask.cluster.generation import build_params, build_prompt
from xdask.cluster.ledger import gpu_ledger
from xdask.engines import create_engine
from xdask.engines.base import Delta, Engine, TaskEngine
from xdask.errors import (
    InvalidRequestError,
    LaunchCancelledError,
    ModelLoadError,
    ModelNotReadyError,
    RateLimitError,
)
from xdask.hub import locate_model
from xdask.hub import progress as launch_board
from xdask.registry.specs import LLMFamily, ResolvedModel

logger = logging.getLogger(__name__)

#: One engine load at a time per worker process. Why: loaders are not
#: thread-safe against each other (transformers' meta-device init patches
#: torch.nn.Module globally: two replicas loading at once on one worker failed
#: with "Cannot copy out of meta tensor" on a 2-GPU host); replicas on
#: different workers still load in parallel.
_LOAD_LOCK = threading.Lock()


class ModelActor:
    """A model replica: its engine, its request threads and its description.

    ``launch`` is the dict built by ``xdask.cluster.supervisor``: the resolved
    spec, the engine name, ``model_path`` and engine kwargs.
    """

    def __init__(self, uid: str, launch: dict[str, Any]):
        self.uid = uid
        self.launch = launch
        self.replica_id = launch.get("replica_id", 0)
        self.gpu_idx: list[int] | None = launch.get("gpu_idx")
        self.resolved = ResolvedModel.model_validate(launch["resolved"])
        worker = get_worker()
        # The worker's own ledger double-checks the scheduler's booking (and frees it on shutdown).
        self._ledger = gpu_ledger(worker)
        self._holder = str(worker.get_current_task() or f"{uid}/{self.replica_id}")
        self._ledger.claim(self._holder, list(self.gpu_idx or []), alive={str(key) for key in worker.state.tasks},
                           shared=bool(launch.get("allow_shared_gpu")))
        # What GET /v1/models/{uid}/progress reads and POST .../cancel flags (xdask.hub.progress).
        progress = launch_board.register(uid, self.replica_id, launch.get("since"))
        try:
            path = locate_model(self.resolved, launch.get("model_path"), download_hub=launch.get("download_hub"),
                                progress=progress)
            self.model_path = str(path)
            progress.set_phase("loading")
            progress.check_cancelled()
            self.engine = create_engine(
                self.resolved, launch["model_engine"], self.model_path, launch.get("engine_kwargs") or {},
                gpu_idx=self.gpu_idx,
            )
            with _LOAD_LOCK:
                progress.check_cancelled()
                self.engine.load()
            if progress.cancelled:  # cancelled while the engine loaded: a load cannot be stopped halfway
                self.engine.close()
                raise LaunchCancelledError(f"The launch of {uid} was cancelled")
        except ModelLoadError as exc:
            self._ledger.release(self._holder)
            if launch.get("model_path"):  # the client's file (not a model, or not this engine's format): 400
                raise InvalidRequestError(f"model_path {launch['model_path']!r} could not be loaded: {exc.message}",
                                          param="model_path", code="model_path_unloadable") from exc
            raise
        except BaseException:
            self._ledger.release(self._holder)
            raise
        finally:
            launch_board.unregister(progress)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self.engine.max_concurrency), thread_name_prefix=f"xdask-{uid}"
        )
        self._closed = False
        self._in_flight = 0  # requests being streamed
        self._generating = 0  # engine jobs still running (a cancelled one ends at its next token)
        self._requests_total = 0  # requests taken since load (how routing spread them)
        # Requests held beyond the engine's slots (None: no bound); the supervisor fixed it at launch.
        queue = launch.get("replica_queue")
        self._queue_limit: int | None = None if queue is None else max(0, int(queue))
        logger.info("Model %s/%s loaded from %s on GPU %s with %s", uid, self.replica_id, self.model_path,
                    self.gpu_idx, self.engine.describe())

    def figures(self) -> dict[str, Any]:
        """The load figures (cheap: no engine call): what ``/metrics`` and the health check read.

        ``queued`` is what waits for one of the engine's ``max_concurrency``
        slots; ``queue_limit`` bounds it (None: no bound).
        """
        return {
            "model_uid": self.uid,
            "replica_id": self.replica_id,
            "in_flight": self._in_flight,
            "queued": max(0, self._in_flight - self.engine.max_concurrency),
            "queue_limit": self._queue_limit,
            "requests_total": self._requests_total,
            "generating": self._generating,
            "max_concurrency": self.engine.max_concurrency,
        }

    async def describe(self) -> dict[str, Any]:
        """What runs here: engine facts, path and in-flight request count."""
        return {
            **self.figures(),
            "gpu_idx": self.gpu_idx,
            "model_path": self.model_path,
            **self.engine.describe(),
        }

    def _admit(self) -> None:
        """Refuse a request when shutting down (503) or when the replica's queue is full (429).

        Why refuse rather than queue without end: a replica whose slots are
        all busy would hold every further request in memory, on the worker
        and on the server, and each would time out eventually; a 429 lets the
        router try another replica and the client back off.
        """
        if self._closed:
            raise ModelNotReadyError(f"Model {self.uid} is shutting down")
        limit = self._queue_limit
        if limit is not None and self._in_flight >= self.engine.max_concurrency + limit:
            raise RateLimitError(
                f"Replica {self.replica_id} of {self.uid} is full: {self._in_flight} requests for "
                f"{self.engine.max_concurrency} slots and a queue of {limit} (xdask.limits.replica-queue)",
                code="replica_queue_full",
            )

    async def stream(self, request: dict[str, Any], incremental: bool = True) -> AsyncIterator[list[Delta]]:
        """Generate for ``request``, yielding whatever deltas are ready each time.

        With ``incremental=False`` (a non-streamed HTTP request) the loop is
        woken once, at the end, instead of once per token: on a small machine
        those wake-ups steal CPU from the decode threads. Closing the iterator
        (``aclose``) tells the engine to stop at its next token either way, so
        a client that hangs up stops using the model.
        """
        self._admit()
        family = self.resolved.family
        if not hasattr(self.engine, "generate") or not isinstance(family, LLMFamily):
            raise InvalidRequestError(
                f"Model {self.uid} is a {family.model_type} model: it does not generate text",
                param="model", code="wrong_model_type",
            )
        engine = cast(Engine, self.engine)
        prompt = build_prompt(family, request, engine)
        params = build_params(family, request)
        loop = asyncio.get_running_loop()
        buffer: list[Delta] = []
        lock = threading.Lock()
        ready = asyncio.Event()
        cancelled = threading.Event()

        def emit(delta: Delta) -> bool:
            with lock:
                buffer.append(delta)
                first = len(buffer) == 1
            if first and incremental:  # one loop wake-up per batch, not per token
                loop.call_soon_threadsafe(ready.set)
            return cancelled.is_set()

        self._in_flight += 1
        self._requests_total += 1
        self._generating += 1
        work = self._pool.submit(engine.generate, prompt, params, emit)
        job: asyncio.Future[Any] = asyncio.wrap_future(work, loop=loop)
        job.add_done_callback(self._job_done)
        try:
            while True:
                waiter: asyncio.Future[Any] = asyncio.ensure_future(ready.wait())
                done, _ = await asyncio.wait({waiter, job}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                ready.clear()
                with lock:
                    batch = buffer[:]
                    buffer.clear()
                if batch:
                    yield batch
                if job.done() and not buffer:
                    job.result()  # raise the engine's error, if any
                    return
        finally:
            cancelled.set()
            # Still waiting for a thread (every slot busy): it never runs. A running one stops at its next token.
            work.cancel()
            self._in_flight -= 1

    async def invoke(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a non-generative op (``{"kind": "invoke", "op", "payload"}``) on the model's threads.

        Embeddings, rerank, images and audio come here (``xdask.engines.TaskEngine``);
        the engine batches concurrent calls itself where it can.
        """
        self._admit()
        op = str(request.get("op"))
        ops: frozenset[str] = getattr(self.engine, "ops", frozenset())
        if op not in ops:
            kind = self.resolved.family.model_type
            raise InvalidRequestError(
                f"Model {self.uid} is a {kind} model: it does not serve {op!r}"
                + (f" (it serves: {', '.join(sorted(ops))})" if ops
                   else " (it generates text: use chat or completions)"),
                param="model", code="wrong_model_type",
            )
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        self._requests_total += 1
        try:
            engine = cast(TaskEngine, self.engine)
            return await loop.run_in_executor(self._pool, engine.invoke, op, request.get("payload") or {})
        finally:
            self._in_flight -= 1

    def _job_done(self, job: asyncio.Future) -> None:
        self._generating -= 1
        if not job.cancelled():
            job.exception()  # retrieved, so an abandoned job's error is not logged as lost

    async def shutdown(self) -> bool:
        """Stop serving and free the engine's memory before the actor is released."""
        if self._closed:
            return False
        self._closed = True
        loop = asyncio.get_running_loop()
        # close() may wait for running requests (llama-cpp-python's lock): off the loop.
        await loop.run_in_executor(None, self.engine.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ledger.release(self._holder)
        gc.collect()
        logger.info("Model %s shut down", self.uid)
        return True
