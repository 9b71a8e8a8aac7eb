"""Token streaming between a model actor and the server, over a Dask comm.

Why not actor calls: each Dask actor call costs ~0.25 ms of CPU per side and
a round trip; one call per token cannot scale (FACTS.md). Instead the server
opens a comm to the actor's worker (from the client's connection pool) and
sends one ``xdask_generate`` op; the worker's handler pushes whatever text
is buffered each time the comm is free, so tokens travel in batches under
load and one by one when idle.

Protocol on one comm, per request::

    server -> worker  {"op": "xdask_generate", "actor_key", "request", "reply": False}
    worker -> server  {"t": text, "f": finish_reason, "u": [prompt, completion]} ...
    worker -> server  {"end": True}            or {"error": {...}}
                      (a non-streamed request gets one message: its text, usage and "end";
                      a non-generative op, ``{"kind": "invoke", "op", "payload"}``, gets
                      ``{"r": result, "end": True}``)
    server -> worker  {"ack": True}            the comm goes back to the pool

Closing the comm before ``end`` cancels the generation on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from distributed.comm.core import CommClosedError

from xdask.engines.base import Delta
from xdask.errors import (
    ConflictError,
    GenerationError,
    InvalidRequestError,
    ModelNotReadyError,
    NotFoundError,
    RateLimitError,
    RequestTimeoutError,
    WorkerLostError,
    XdaskError,
)

logger = logging.getLogger(__name__)

OP = "xdask_generate"


def _merge(batch: list[Delta]) -> dict[str, Any]:
    """One wire message for a batch of deltas: joined text, last finish and usage."""
    msg: dict[str, Any] = {"t": "".join(d.text for d in batch), "f": None, "u": None}
    for d in batch:
        if d.finish_reason is not None:
            msg["f"] = d.finish_reason
        if d.completion_tokens is not None:
            msg["u"] = [d.prompt_tokens or 0, d.completion_tokens]
    return msg


class StreamHandler:
    """The worker side: runs ``ModelActor.stream`` and writes batches to the comm."""

    def __init__(self, worker: Any):
        self.worker = worker

    async def handle(self, comm: Any, actor_key: str, request: dict[str, Any]) -> None:
        # Reading concurrently tells us when the server hangs up (cancel).
        reader = asyncio.ensure_future(comm.read())
        actor = self.worker.state.actors.get(actor_key)
        try:
            if actor is None:
                await comm.write({"error": {"status": 503, "type": "service_unavailable",
                                            "message": "model is not on this worker any more",
                                            "param": None, "code": "model_gone"}})
            else:
                await self._pump(comm, actor, request, reader)
        except (CommClosedError, OSError):
            pass
        finally:
            try:
                await reader  # the server's ack, or the comm closing
            except (CommClosedError, OSError):
                pass

    async def _pump(self, comm: Any, actor: Any, request: dict[str, Any], reader: asyncio.Future) -> None:
        from xdask.cluster.actor import error_payload

        if request.get("kind") == "invoke":  # a non-generative op: one answer
            await self._invoke(comm, actor, request, reader)
            return
        incremental = bool(request.get("stream", True))
        gen = actor.stream(request, incremental=incremental)
        held: list[Delta] = []  # non-incremental: everything goes out with "end"
        try:
            while True:
                step = asyncio.ensure_future(anext(gen))
                await asyncio.wait({step, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the server closed the comm: stop generating
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    return
                try:
                    batch = step.result()
                except StopAsyncIteration:
                    break
                if incremental:
                    await comm.write(_merge(batch))
                else:
                    held.extend(batch)
            await comm.write({**_merge(held), "end": True} if held else {"end": True})
        except (CommClosedError, OSError):
            raise
        except Exception as exc:  # the engine's error, reported to the server
            if not isinstance(exc, XdaskError):
                logger.exception("Generation failed")
            await comm.write({"error": error_payload(exc)})
        finally:
            await gen.aclose()


    async def _invoke(self, comm: Any, actor: Any, request: dict[str, Any], reader: asyncio.Future) -> None:
        """``{"r": result, "end": True}`` or ``{"error": ...}``; the server hanging up abandons the result."""
        from xdask.cluster.actor import error_payload

        call = asyncio.ensure_future(actor.invoke(request))
        await asyncio.wait({call, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not call.done():  # the server closed the comm; the op finishes on its thread, unread
            call.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        try:
            result = call.result()
        except Exception as exc:
            if not isinstance(exc, XdaskError):
                logger.exception("%s failed", request.get("op"))
            await comm.write({"error": error_payload(exc)})
            return
        await comm.write({"r": result, "end": True})


def install_stream_handler(worker: Any) -> None:
    """Add the ``xdask_generate`` op to a worker (idempotent)."""
    if OP not in worker.handlers:
        worker.handlers[OP] = StreamHandler(worker).handle


_ERRORS: dict[int, type[XdaskError]] = {
    400: InvalidRequestError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitError,
    503: ModelNotReadyError,
    504: RequestTimeoutError,
}


def error_from_payload(payload: dict[str, Any]) -> XdaskError:
    """Rebuild the worker's exception on the server side."""
    cls = _ERRORS.get(int(payload.get("status", 500)), GenerationError)
    exc = cls(str(payload.get("message")), param=payload.get("param"), code=payload.get("code"))
    exc.type = payload.get("type") or exc.type
    return exc


async def open_stream(pool: Any, address: str, actor_key: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The server side: yield the worker's messages for one request.

    ``pool`` is the Dask client's ``ConnectionPool`` (``client.rpc``), so comms
    are reused across requests. Leaving the iterator early aborts the comm,
    which cancels generation on the worker.
    """
    try:
        comm = await pool.connect(address)
    except (OSError, CommClosedError) as exc:
        raise WorkerLostError(f"cannot reach the model's worker {address}: {exc}") from exc
    clean = False
    try:
        await comm.write({"op": OP, "actor_key": actor_key, "request": request, "reply": False})
        while True:
            msg = await comm.read()
            if "error" in msg:
                await comm.write({"ack": True})
                clean = True
                raise error_from_payload(msg["error"])
            if msg.get("end"):
                await comm.write({"ack": True})
                clean = True
                if "t" in msg or "r" in msg:
                    yield msg
                return
            yield msg
    except (CommClosedError, OSError) as exc:
        raise WorkerLostError(f"lost the connection to the model's worker {address}: {exc}") from exc
    finally:
        if clean:
            pool.reuse(address, comm)
        else:
            comm.abort()
