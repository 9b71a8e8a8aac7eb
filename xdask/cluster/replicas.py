"""Starting, describing and stopping one model replica (a ``ModelActor``) on its worker.

Both a first launch and a relaunch after a worker died go through
``start_replica``, so a relaunched replica is built exactly like the first.

Why the polling in ``start_replica``: a Dask actor task whose only allowed
worker dies is not failed by Dask, it waits for that worker forever; the
registry marks the replica lost within milliseconds, so the launcher watches
the registry and gives up at once instead of at the launch timeout.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from distributed import Client

from xdask import config
from xdask.cluster.actor import ModelActor
from xdask.errors import ModelLoadError, ModelNotReadyError, WorkerLostError, XdaskError

logger = logging.getLogger(__name__)


async def _shutdown_actor(dask_worker: Any, actor_key: str) -> bool:
    """Run on the worker: free the engine of the actor ``actor_key``."""
    actor = dask_worker.state.actors.get(actor_key)
    if actor is None:
        return False
    return await actor.shutdown()


async def _describe_actor(dask_worker: Any, actor_key: str) -> dict[str, Any] | None:
    """Run on the worker: the actor's own description (engine, GPUs, load), None if gone."""
    actor = dask_worker.state.actors.get(actor_key)
    return None if actor is None else await actor.describe()


def scheduler_of(client: Client) -> Any:
    """The client's scheduler RPC, whose ``xdask_*`` handlers are the registry's (``registry_plugin``).

    ``Any``: Dask builds an RPC method per attribute, so they have no static types.
    """
    if client.scheduler is None:
        raise ModelNotReadyError("Not connected to the Dask scheduler")
    return client.scheduler


def _call_timeout() -> float:
    return float(config.get("cluster.call-timeout"))


async def run_on_worker(client: Client, func: Any, address: str, **kwargs: Any) -> Any:
    """``func(dask_worker, **kwargs)`` on one worker, with the control-call timeout."""
    result = await asyncio.wait_for(
        client.run(func, workers=[address], on_error="return", **kwargs), _call_timeout()
    )
    value = result.get(address)
    if isinstance(value, BaseException):
        raise value
    return value


async def describe_replica(client: Client, replica: dict[str, Any]) -> dict[str, Any] | None:
    """The live description of a replica's actor, or None when unreachable."""
    if not replica.get("actor_key"):
        return None
    try:
        return await run_on_worker(client, _describe_actor, replica["address"], actor_key=replica["actor_key"])
    except (OSError, TimeoutError, KeyError, ValueError) as exc:
        logger.debug("Cannot describe %s: %s", replica.get("actor_key"), exc)
        return None


async def shutdown_replica(client: Client, replica: dict[str, Any]) -> None:
    """Free a replica's engine on its worker; a worker already gone is fine."""
    if not replica.get("actor_key"):
        return
    try:
        await run_on_worker(client, _shutdown_actor, replica["address"], actor_key=replica["actor_key"])
    except (OSError, TimeoutError, KeyError, ValueError) as exc:
        logger.warning("Could not shut down %s on %s: %s", replica["actor_key"], replica["address"], exc)


async def _replica_state(client: Client, uid: str, replica_id: int) -> str | None:
    record = await scheduler_of(client).xdask_model(uid=uid)
    if record is None:
        return None
    for rep in record["replicas"]:
        if rep["replica_id"] == replica_id:
            return rep["state"]
    return None


async def start_replica(client: Client, uid: str, replica: dict[str, Any], launch: dict[str, Any]) -> str:
    """Load one replica as an actor on its placed worker and mark it ready; returns the actor key.

    On failure the replica is marked failed in the registry (its GPUs freed)
    and the error is raised as an ``XdaskError``.
    """
    rid = replica["replica_id"]
    address = replica["address"]
    key = f"xdask-model-{uid}-{rid}-{uuid.uuid4().hex[:8]}"
    # ``since`` (when the registry placed this replica) names this launch for a cancel (xdask.hub.progress).
    actor_launch = {**launch, "gpu_idx": list(replica.get("gpu_idx") or []), "replica_id": rid,
                    "since": replica.get("since")}
    future = client.submit(
        ModelActor, uid, actor_launch, actor=True, key=key,
        workers=[address], allow_other_workers=False, pure=False,
    )
    timeout = float(config.get("launch.timeout"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        waiter = asyncio.ensure_future(future)
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.5)
            if done:
                waiter.result()
                break
            state = await _replica_state(client, uid, rid)
            if state is None:
                raise ModelLoadError(f"Model {uid} was terminated while replica {rid} was loading")
            if state == "lost":
                raise WorkerLostError(f"Worker {address} left while replica {rid} of {uid} was loading")
            if loop.time() > deadline:
                raise ModelLoadError(f"Replica {rid} of {uid} did not load within {timeout:.0f} s")
        engine = await run_on_worker(client, _describe_actor, address, actor_key=key)
    except BaseException as exc:
        future.cancel()
        if not waiter.done():
            waiter.cancel()
        error = exc if isinstance(exc, XdaskError) else ModelLoadError(
            f"Failed to load {uid} on {address}: {type(exc).__name__}: {exc}"
        )
        try:
            await scheduler_of(client).xdask_replica_failed(uid=uid, replica_id=rid, error=error.message)
        except OSError:
            pass
        if isinstance(exc, XdaskError) or not isinstance(exc, Exception):
            raise
        raise error from exc
    done = await scheduler_of(client).xdask_replica_ready(uid=uid, replica_id=rid, actor_key=key, engine=engine)
    future.release()  # the registry holds the actor from here on
    if not done["ok"]:
        await shutdown_replica(client, {"actor_key": key, "address": address})
        raise ModelLoadError(done.get("message") or f"replica {rid} of {uid} was removed while loading")
    logger.info("Replica %s/%s ready on %s (GPU %s)", uid, rid, address, replica.get("gpu_idx"))
    return key
