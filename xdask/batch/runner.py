"""Run OpenAI request bodies against a model from inside the cluster: the batch engine.

Every batch entry point ends here: the Python client's ``chat_batch`` /
``generate_batch`` futures, the dask-collection helpers (``map_chat`` on a
dataframe column or a bag) and the server's OpenAI Batch API. Each submits
Dask tasks of ``run_chunk``; a chunk's items go to the model concurrently,
so the engine batches them, and the task ends when all have an outcome.

Why a Dask task and not the HTTP server: the items never pass through the
server (no JSON/HTTP per item), Dask retries a chunk whose worker died,
its futures work with ``as_completed``/``gather``/``progress``, and the
cluster's worker threads bound how many chunks run at once, which keeps the
model full and memory flat.

A chunk task runs on the worker's event loop (``async def``) and is served
by the same functions as an HTTP request (``xdask.cluster.serving``): a
``Router`` over the worker's connection pool (least outstanding requests, a
gone replica retried on another) and the ``xdask_generate`` stream op. One
router per worker process, so chunks on one worker balance together.

Outcomes are plain dicts, one per item, in order::

    {"response": <chat.completion | text_completion | embeddings list>, "error": None, "attempts": 1}
    {"response": None, "error": XdaskError.to_wire(), "attempts": 3}   (status, type, message, param, code, ...)

An item is retried (on whatever replica is ready, after a backoff) only when
the model was unreachable: a lost replica or worker, or a model with no
ready replica yet (503); a bad request (400) or an engine error is final.

Examples
--------
>>> from distributed import Client                                  # doctest: +SKIP
>>> client = Client("tcp://127.0.0.1:8786")
>>> fut = client.submit(run_chunk, "gemma", "chat", [{"messages": [{"role": "user", "content": "Hi"}]}])
>>> fut.result()[0]["response"]["choices"][0]["message"]["content"]
"""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic

from xdask import config
from xdask.api.base import validation_error
from xdask.api.chat import ChatCompletionRequest, CompletionRequest
from xdask.api.embeddings import EmbeddingRequest
from xdask.cluster import serving
from xdask.cluster.routing import Router
from xdask.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    RateLimitError,
    XdaskError,
    internal_wire,
)

#: A batch item's validated body.
BatchRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest

#: Request kinds a batch item may be, and the schema that validates its body.
SCHEMAS: dict[str, type[BatchRequest]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
    "embedding": EmbeddingRequest,
}

#: OpenAI URL of each kind (the Batch API's ``url`` field).
URLS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}

#: Seconds a worker's router trusts a model's registry record (as the server does).
_RECORD_TTL = 2.0


def error_outcome(exc: BaseException, attempts: int = 1) -> dict[str, Any]:
    """The outcome of an item that failed for good."""
    return {"response": None, "error": internal_wire(exc), "attempts": attempts}


def parse_item(kind: str, uid: str, body: Any) -> BatchRequest:
    """Validate one item's OpenAI body (``model`` is set to ``uid``; streaming is off)."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise InvalidRequestError(f"Unknown batch request kind {kind!r}; known: {', '.join(SCHEMAS)}",
                                  param="kind")
    if not isinstance(body, dict):
        raise InvalidRequestError("A batch item's body must be a JSON object")
    try:
        return schema.model_validate({**body, "model": uid, "stream": False})
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def worker_router(worker: Any) -> Router:
    """This worker process's router to model replicas (made once)."""
    router = getattr(worker, "_xdask_batch_router", None)
    if router is None:
        router = Router(worker.rpc, lambda uid: worker.scheduler.xdask_model(uid=uid), ttl=_RECORD_TTL)
        worker._xdask_batch_router = router
    return router


async def run_item(router: Router, uid: str, kind: str, body: Any, retries: int, backoff: float) -> dict[str, Any]:
    """One item's outcome; never raises (except cancellation)."""
    try:
        req = parse_item(kind, uid, body)
    except XdaskError as exc:
        return error_outcome(exc)
    attempts = 0
    while True:
        attempts += 1
        try:
            # Bounded by xdask.server.request-timeout inside, as an HTTP request is (504).
            record = await router.record(uid, fresh=attempts > 1)
            if isinstance(req, EmbeddingRequest):
                response, _ = await serving.embed(router, record, req)
            else:
                response = await serving.answer(router, record, req)
            return {"response": response, "error": None, "attempts": attempts}
        except (ModelNotReadyError, RateLimitError) as exc:  # lost, not ready yet or full: worth another try
            if attempts > retries:
                return error_outcome(exc, attempts)
            await asyncio.sleep(min(backoff * 2 ** (attempts - 1), 30.0))
        except Exception as exc:  # noqa: BLE001  (an item's failure is its outcome, not the batch's)
            return error_outcome(exc, attempts)


async def run_chunk(uid: str, kind: str, bodies: list[Any], retries: int | None = None,
                    backoff: float | None = None) -> list[dict[str, Any]]:
    """A Dask task: every body of the chunk sent to model ``uid`` at once; their outcomes in order."""
    from distributed import get_worker

    return await run_bodies(get_worker(), uid, kind, bodies, retries, backoff)


async def run_bodies(worker: Any, uid: str, kind: str, bodies: list[Any], retries: int | None = None,
                     backoff: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """``run_chunk`` for a given worker (also called from a worker thread through ``sync``).

    ``limit``: at most that many items at the model at once, a sliding
    window (the next item starts as soon as one ends, so a long partition
    keeps the engine full without a pause at the end of every chunk).
    """
    retries = int(config.get("batch.retries")) if retries is None else int(retries)
    backoff = float(config.get("batch.retry-backoff")) if backoff is None else float(backoff)
    router = worker_router(worker)
    if not limit or limit >= len(bodies):
        return list(await asyncio.gather(*(run_item(router, uid, kind, b, retries, backoff) for b in bodies)))
    window = asyncio.Semaphore(limit)

    async def one(body: Any) -> dict[str, Any]:
        async with window:
            return await run_item(router, uid, kind, body, retries, backoff)

    return list(await asyncio.gather(*(one(b) for b in bodies)))


def run_chunk_in_thread(uid: str, kind: str, bodies: list[Any], retries: int | None = None,
                        backoff: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """``run_chunk`` from a task that runs in a worker thread (a dataframe or bag partition)."""
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    return sync(worker.loop, run_bodies, worker, uid, kind, bodies, retries, backoff, limit)
