"""Token streaming between a model actor and the server, over a Dask comm.

Why not actor calls: each Dask actor call costs ~0.25 ms of CPU per side and
a round trip; one call per token cannot scale (FACTS.md). Instead the server
opens a comm to the actor's worker (from the client's connection pool) and
sends one ``xdask_generate`` op; the worker's handler pushes whatever text
is buffered each time the comm is free, so tokens travel in batches under
load and one by one when idle.

Protocol on one comm, per request (the messages are ``xdask.api.wire`` types)::

    server -> worker  {"op": "xdask_generate", "actor_key", "request", "reply": False}
    worker -> server  {"text", "finish_reason", "usage": {prompt_tokens, completion_tokens}} ...
    worker -> server  {"end": True}            or {"error": XdaskError.to_wire()}
                      (a non-streamed request gets one message: its text, usage and "end";
                      a non-generative op, ``{"kind": "invoke", "op", "payload"}``, gets
                      ``{"result": ..., "end": True}``)
    server -> worker  {"ack": True}            the comm goes back to the pool

Closing the comm before ``end`` cancels the generation on the worker. The
worker side is installed by ``xdask.cluster.worker.XdaskWorkerPlugin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from distributed.comm.core import CommClosedError

from xdask.api.wire import Chunk, GenerationRequest, InvokeRequest, Usage
from xdask.engines.base import Delta
from xdask.errors import (
    ModelNotReadyError,
    WorkerLostError,
    XdaskError,
    from_wire,
    internal_wire,
)

logger = logging.getLogger(__name__)

OP = "xdask_generate"


def merge_deltas(batch: list[Delta]) -> Chunk:
    """One wire message for a batch of deltas: joined text, last finish and usage."""
    finish: str | None = None
    usage: Usage | None = None
    for d in batch:
        if d.finish_reason is not None:
            finish = d.finish_reason
        if d.completion_tokens is not None:
            usage = {"prompt_tokens": d.prompt_tokens or 0, "completion_tokens": d.completion_tokens}
    return {"text": "".join(d.text for d in batch), "finish_reason": finish, "usage": usage}


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
                gone = ModelNotReadyError("model is not on this worker any more", code="model_gone")
                await comm.write({"error": gone.to_wire()})
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
                    await comm.write(merge_deltas(batch))
                else:
                    held.extend(batch)
            await comm.write({**merge_deltas(held), "end": True} if held else {"end": True})
        except (CommClosedError, OSError):
            raise
        except Exception as exc:  # the engine's error, reported to the server
            if not isinstance(exc, XdaskError):
                logger.exception("Generation failed")
            await comm.write({"error": internal_wire(exc)})
        finally:
            await gen.aclose()


    async def _invoke(self, comm: Any, actor: Any, request: dict[str, Any], reader: asyncio.Future) -> None:
        """``{"result": ..., "end": True}`` or ``{"error": ...}``; the server hanging up abandons the result."""
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
            await comm.write({"error": internal_wire(exc)})
            return
        await comm.write({"result": result, "end": True})


async def open_stream(pool: Any, address: str, actor_key: str,
                      request: GenerationRequest | InvokeRequest) -> AsyncIterator[Chunk]:
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
                raise from_wire(msg["error"])
            if msg.get("end"):
                await comm.write({"ack": True})
                clean = True
                if "text" in msg or "result" in msg:
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
