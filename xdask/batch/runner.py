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

A chunk task runs on the worker's event loop (``async def``) and reaches a
replica the way the server does: a ``Router`` over the worker's connection
pool (least outstanding requests, a gone replica retried on another) and
the ``xdask_generate`` stream op. One router per worker process, so chunks
on one worker balance together.

Outcomes are plain dicts, one per item, in order::

    {"response": <chat.completion | text_completion | embeddings list>, "error": None, "attempts": 1}
    {"response": None, "error": {"status", "type", "message", "param", "code"}, "attempts": 3}

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
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic

from xdask import config
from xdask.cluster.routing import Router
from xdask.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    NotFoundError,
    RateLimitError,
    RequestTimeoutError,
    XdaskError,
)
from xdask.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    internal_request,
    resolve_max_tokens,
    validation_error,
)
from xdask.responses import chat_completion, embedding_list, text_completion, usage

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
    if isinstance(exc, XdaskError):
        err = {"status": exc.status, "type": exc.type, "message": exc.message, "param": exc.param,
               "code": exc.code}
    else:
        err = {"status": 500, "type": "internal_error", "message": f"{type(exc).__name__}: {exc}",
               "param": None, "code": None}
    return {"response": None, "error": err, "attempts": attempts}


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


def _record_getter(worker: Any) -> Callable[[str, bool], Awaitable[dict[str, Any]]]:
    """``(uid, fresh) -> record`` over the scheduler's registry, cached for ``_RECORD_TTL``."""
    cache: dict[str, tuple[float, dict[str, Any]]] = {}

    async def get_record(uid: str, fresh: bool) -> dict[str, Any]:
        hit = cache.get(uid)
        if not fresh and hit is not None and time.monotonic() - hit[0] < _RECORD_TTL:
            return hit[1]
        record = await worker.scheduler.xdask_model(uid=uid)
        if record is None:
            cache.pop(uid, None)
            raise NotFoundError(f"Model not found in the model list, uid: {uid}", param="model",
                                code="model_not_found")
        cache[uid] = (time.monotonic(), record)
        return record

    return get_record


def worker_router(worker: Any) -> Router:
    """This worker process's router to model replicas (made once)."""
    router = getattr(worker, "_xdask_batch_router", None)
    if router is None:
        router = Router(worker.rpc, _record_getter(worker))
        worker._xdask_batch_router = router
    return router


async def run_item(router: Router, uid: str, kind: str, body: Any, retries: int, backoff: float) -> dict[str, Any]:
    """One item's outcome; never raises (except cancellation)."""
    try:
        req = parse_item(kind, uid, body)
    except XdaskError as exc:
        return error_outcome(exc)
    timeout = float(config.get("server.request-timeout"))
    attempts = 0
    while True:
        attempts += 1
        try:
            async with asyncio.timeout(timeout):
                if isinstance(req, EmbeddingRequest):
                    response = await _embed(router, uid, req)
                else:
                    response = await _generate(router, uid, req, fresh=attempts > 1)
            return {"response": response, "error": None, "attempts": attempts}
        except TimeoutError:
            return error_outcome(RequestTimeoutError(f"The model took longer than {timeout} s"), attempts)
        except (ModelNotReadyError, RateLimitError) as exc:  # lost, not ready yet or full: worth another try
            if attempts > retries:
                return error_outcome(exc, attempts)
            await asyncio.sleep(min(backoff * 2 ** (attempts - 1), 30.0))
        except Exception as exc:  # noqa: BLE001  (an item's failure is its outcome, not the batch's)
            return error_outcome(exc, attempts)


async def _generate(router: Router, uid: str, req: ChatCompletionRequest | CompletionRequest,
                    fresh: bool) -> dict[str, Any]:
    """One chat or completion answer, as its OpenAI body."""
    record = await router._get_record(uid, fresh)
    internal = internal_request(req, resolve_max_tokens(req.requested_max_tokens,
                                                        int(record["spec"]["context_length"])))
    text: list[str] = []
    finish: str | None = None
    counts = (0, 0)
    async for msg in router.stream(uid, internal):
        text.append(msg["t"])
        finish = msg["f"] or finish
        if msg.get("u"):
            counts = (int(msg["u"][0]), int(msg["u"][1]))
    build = chat_completion if isinstance(req, ChatCompletionRequest) else text_completion
    return build(uid, "".join(text), finish, usage(*counts))


async def _embed(router: Router, uid: str, req: EmbeddingRequest) -> dict[str, Any]:
    """One embeddings answer (the model's ``embed`` op), as OpenAI's ``list`` body.

    A model of another type answers 400 ``wrong_model_type`` from its actor.
    """
    async for msg in router.stream(uid, {"kind": "invoke", "op": "embed", "payload": req.payload()}):
        if "r" in msg:
            return embedding_list(uid, msg["r"], req.encoding_format)
    raise XdaskError(f"Model {uid} ended embed without a result")


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
