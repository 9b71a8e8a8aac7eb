"""``Supervisor``: launch, find, route to and terminate models on a Dask cluster.

It is the engine-agnostic control logic behind the HTTP server (and usable
from a notebook with an async client): it validates a launch against the
catalog, places the actor, records it in the scheduler's ``ModelRegistry``
and routes generation requests to a replica over the stream comm.

Examples
--------
>>> sup = await Supervisor.connect("tcp://127.0.0.1:8786")      # doctest: +SKIP
>>> uid = await sup.launch({"model_name": "gemma-3-270m", "model_engine": "llama.cpp"})
>>> async for msg in sup.stream(uid, {"kind": "completion", "prompt": "Hi", "params": {"max_tokens": 8}}):
...     print(msg["t"], end="")
>>> await sup.terminate(uid)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from distributed import Client

from xdask import config
from xdask.cluster.actor import ModelActor
from xdask.cluster.placement import choose_worker
from xdask.cluster.registry_plugin import ModelRegistry
from xdask.cluster.stream import open_stream
from xdask.engines import check_engine
from xdask.engines.matrix import collect_host_facts, family_matrix, why_not
from xdask.errors import (
    ConflictError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotReadyError,
    NotFoundError,
    WorkerLostError,
    XdaskError,
)
from xdask.registry import get_family, resolve

logger = logging.getLogger(__name__)

#: Launch fields that describe the model; everything else goes to the engine.
_LAUNCH_FIELDS = {
    "model_uid", "model_name", "model_type", "model_engine", "model_format",
    "model_size_in_billions", "quantization", "replica", "n_gpu", "gpu_idx",
    "worker_ip", "model_path", "n_worker", "request_limits", "peft_model_config",
    "replica_config", "enable_thinking", "enable_virtual_env", "virtual_env_packages",
    "virtual_env_find_links", "envs", "model_hub", "download_hub",
}


async def _shutdown_actor(dask_worker: Any, actor_key: str) -> bool:
    """Run on the worker: free the engine of the actor ``actor_key``."""
    actor = dask_worker.state.actors.get(actor_key)
    if actor is None:
        return False
    return await actor.shutdown()


async def _describe_actor(dask_worker: Any, actor_key: str) -> dict[str, Any]:
    """Run on the worker: the actor's own description (engine, backend, slots)."""
    return await dask_worker.state.actors[actor_key].describe()


class Supervisor:
    """Control plane of xdask over one async Dask ``Client``."""

    def __init__(self, client: Client):
        self.client = client
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._round_robin = itertools.count()
        self._ttl = 2.0
        self._hosts: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._hosts_ttl = 30.0

    @classmethod
    async def connect(cls, address: str | Any) -> Supervisor:
        """An async client to ``address`` (or a cluster object) with the registry plugin."""
        client = await Client(address, asynchronous=True, direct_to_workers=True, set_as_default=False)
        await client.register_plugin(ModelRegistry())
        return cls(client)

    async def close(self) -> None:
        await self.client.close()

    # -- catalog of running models ---------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        return await self.client.scheduler.xdask_models()

    async def get_model(self, uid: str) -> dict[str, Any]:
        record = await self.client.scheduler.xdask_model(uid=uid)
        if record is None:
            self._cache.pop(uid, None)
            raise NotFoundError(f"Model not found in the model list, uid: {uid}", param="model", code="model_not_found")
        self._cache[uid] = (time.monotonic(), record)
        return record

    async def _record(self, uid: str) -> dict[str, Any]:
        hit = self._cache.get(uid)
        if hit is not None and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        return await self.get_model(uid)

    # -- engines -------------------------------------------------------------

    async def host_facts(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Each worker's platform, GPUs and engine packages (cached for 30 s)."""
        now = time.monotonic()
        if not refresh and self._hosts is not None and now - self._hosts[0] < self._hosts_ttl:
            return self._hosts[1]
        facts = await self.client.run(collect_host_facts, on_error="return")
        hosts = {addr: f for addr, f in facts.items() if isinstance(f, dict)}
        self._hosts = (now, hosts)
        return hosts

    async def engine_matrix(self, model_name: str) -> dict[str, list[dict[str, Any]]]:
        """``GET /v1/engines/{model_name}``: which engine runs which spec here, or why not."""
        family = get_family(model_name)
        return family_matrix(family, list((await self.host_facts()).values()))

    # -- launch / terminate ----------------------------------------------

    async def launch(self, request: dict[str, Any]) -> str:
        """Load a model as an actor on a worker; returns its uid once ready."""
        model_name = request.get("model_name")
        if not model_name:
            raise InvalidRequestError("model_name is required", param="model_name")
        model_type = request.get("model_type") or "LLM"
        if model_type != "LLM":
            raise InvalidRequestError(f"model_type {model_type!r} is not supported yet", param="model_type")
        resolved = resolve(
            model_name,
            request.get("model_format"),
            request.get("model_size_in_billions"),
            request.get("quantization"),
        )
        hosts = await self.host_facts()
        engine = check_engine(resolved, request.get("model_engine"), list(hosts.values()))
        if int(request.get("replica") or 1) != 1:
            raise InvalidRequestError("replica > 1 is not supported yet", param="replica")
        uid = request.get("model_uid") or model_name
        engine_kwargs = {k: v for k, v in request.items() if k not in _LAUNCH_FIELDS and v is not None}
        gpu_idx = request.get("gpu_idx")
        if isinstance(gpu_idx, int):
            gpu_idx = [gpu_idx]

        identity = await self.client.scheduler.identity()
        fmt = resolved.spec.model_format
        # Only workers where the engine is installed and runs (FACTS: the server may have none).
        workers = {
            addr: w for addr, w in identity.get("workers", {}).items()
            if addr not in hosts or why_not(engine, fmt, hosts[addr]) is None
        }
        records = await self.list_models()
        per_worker: dict[str, int] = {}
        for rec in records:
            for rep in rec["replicas"]:
                per_worker[rep["address"]] = per_worker.get(rep["address"], 0) + 1
        bookings = await self.client.scheduler.xdask_gpu_bookings()
        placement = choose_worker(
            workers, bookings, per_worker,
            n_gpu=request.get("n_gpu", "auto"), worker_ip=request.get("worker_ip"), gpu_idx=gpu_idx,
        )
        family = resolved.family
        spec = {
            "model_name": family.model_name,
            "model_type": "LLM",
            "model_engine": engine,
            "model_format": resolved.spec.model_format,
            "model_size_in_billions": resolved.spec.model_size_in_billions,
            "quantization": resolved.quantization,
            "model_ability": family.model_ability,
            "model_lang": family.model_lang,
            "model_description": family.model_description,
            "model_family": family.model_family or family.model_name,
            "context_length": family.context_length,
            "engine_kwargs": engine_kwargs,
        }
        replica = {"address": placement.address, "gpu_idx": placement.gpu_idx, "actor_key": None}
        claim = await self.client.scheduler.xdask_reserve_model(uid=uid, spec=spec, replicas=[replica])
        if not claim["ok"]:
            raise ConflictError(claim["reason"], param="model_uid")
        launch = {
            "resolved": resolved.model_dump(mode="json"),
            "model_engine": engine,
            "model_path": request.get("model_path"),
            "engine_kwargs": engine_kwargs,
            "gpu_idx": placement.gpu_idx,
        }
        key = f"xdask-model-{uid}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(
            ModelActor, uid, launch, actor=True, key=key,
            workers=[placement.address], allow_other_workers=False, pure=False,
        )
        try:
            await asyncio.wait_for(future, timeout=float(config.get("launch.timeout")))
            described = await self.client.run(_describe_actor, actor_key=key, workers=[placement.address])
            replica["engine"] = described[placement.address]
        except BaseException as exc:
            await self.client.scheduler.xdask_remove_model(uid=uid)
            future.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise ModelLoadError(f"Model {uid} did not load within {config.get('launch.timeout')} s") from exc
            if isinstance(exc, XdaskError):
                raise
            if isinstance(exc, Exception):
                raise ModelLoadError(f"Failed to launch {model_name}: {type(exc).__name__}: {exc}") from exc
            raise
        replica["actor_key"] = key
        done = await self.client.scheduler.xdask_model_ready(uid=uid, replicas=[replica])
        future.release()  # the registry holds the actor from here on
        if not done["ok"]:
            await self.client.run(_shutdown_actor, actor_key=key, workers=[placement.address])
            raise ConflictError(done["reason"])
        logger.info("Launched %s (%s) on %s", uid, engine, placement.address)
        return uid

    async def terminate(self, uid: str) -> None:
        """Free the model's memory on its worker(s) and forget it."""
        record = await self.get_model(uid)
        for rep in record["replicas"]:
            if rep.get("actor_key"):
                try:
                    await self.client.run(
                        _shutdown_actor, actor_key=rep["actor_key"], workers=[rep["address"]], on_error="return"
                    )
                except (OSError, ValueError) as exc:  # worker already gone
                    logger.warning("Could not shut down %s on %s: %s", uid, rep["address"], exc)
        await self.client.scheduler.xdask_remove_model(uid=uid)
        self._cache.pop(uid, None)
        logger.info("Terminated %s", uid)

    async def terminate_all(self) -> None:
        """Terminate every model (used when an embedded cluster shuts down)."""
        for record in await self.list_models():
            await self.terminate(record["model_uid"])

    # -- requests -----------------------------------------------------------

    async def stream(self, uid: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Route one generation request to a replica and yield its messages."""
        record = await self._record(uid)
        if record["state"] != "ready":
            record = await self.get_model(uid)  # the cache may be stale
            if record["state"] != "ready":
                raise ModelNotReadyError(f"Model {uid} is {record['state']}", code=f"model_{record['state']}")
        replicas = [r for r in record["replicas"] if r.get("actor_key")]
        rep = replicas[next(self._round_robin) % len(replicas)]
        try:
            async for msg in open_stream(self.client.rpc, rep["address"], rep["actor_key"], request):
                yield msg
        except (WorkerLostError, ModelNotReadyError):
            self._cache.pop(uid, None)
            raise
