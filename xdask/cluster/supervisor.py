"""``Supervisor``: launch, find, route to and terminate models on a Dask cluster.

It is the engine-agnostic control logic behind the HTTP server (and usable
from a notebook with an async client): it validates a launch against the
catalog and the engine matrix, has the scheduler's ``ModelRegistry`` place
and book every replica, loads the actors, routes requests to the replica
with the fewest outstanding requests (``routing``) and relaunches replicas
lost with a dead worker (``recovery``).

Examples
--------
>>> sup = await Supervisor.connect("tcp://127.0.0.1:8786")      # doctest: +SKIP
>>> uid = await sup.launch(LaunchModelRequest(model_name="gemma-3-270m", model_engine="llama.cpp", replica=2))
>>> record = await sup.record(uid)
>>> async for chunk in sup.router.stream(uid, {"kind": "completion", "prompt": "Hi",
...                                            "params": {"max_tokens": 8}}, record=record):
...     print(chunk["text"], end="")
>>> await sup.terminate(uid)
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections import Counter
from typing import Any

import dask.config
import pydantic
from distributed import Client
from distributed.utils import format_dashboard_link

from xdask import config
from xdask.api.base import validation_error
from xdask.api.models import LaunchModelRequest
from xdask.cluster.memory import estimate_replica_bytes
from xdask.cluster.placement import PlacementRequest
from xdask.cluster.recovery import Recovery
from xdask.cluster.registry_plugin import ModelRegistry
from xdask.cluster.replicas import describe_replica, scheduler_of, shutdown_replica, start_replica
from xdask.cluster.routing import Router
from xdask.cluster.worker import XdaskWorkerPlugin
from xdask.engines import check_engine
from xdask.engines.host import gpu_free_memory
from xdask.engines.matrix import collect_host_facts, family_matrix, why_not
from xdask.errors import ConflictError, InvalidRequestError, NotFoundError, XdaskError, from_wire
from xdask.hub.cache import check_model_version, list_cached, remove_cached
from xdask.hub.download import preferred_hub
from xdask.hub.progress import (
    LAUNCHING_STATES,
    launch_report,
    worker_cancel,
    worker_progress,
)
from xdask.registry import resolve
from xdask.registry.families import find_family, normalize_model_type, type_facts

logger = logging.getLogger(__name__)

class Supervisor:
    """Control plane of xdask over one async Dask ``Client``."""

    def __init__(self, client: Client, watch: bool = True):
        self.client = client
        self._hosts: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._hosts_ttl = 30.0
        self._dask_dashboard: tuple[float, str | None] | None = None
        #: Model launches through this supervisor by outcome (``ok``, ``failed``): ``/metrics`` reads it.
        self.launches: Counter[str] = Counter()
        #: Routes requests to replicas and keeps the registry records of the models (2 s, and the watch loop).
        self.router = Router(client.rpc, lambda uid: self.scheduler.xdask_model(uid=uid))
        self.recovery = Recovery(client, self.router.refresh, self._excluded_for, self.gpu_free)
        if watch:
            self.recovery.start()

    @classmethod
    async def connect(cls, address: str | Any, watch: bool = True) -> Supervisor:
        """An async client to ``address`` (or a cluster object) with the registry plugin.

        ``watch`` runs the recovery loop (relaunching lost replicas); every
        server does, and the registry makes sure only one relaunches each.
        """
        dask.config.set(dict(config.get("cluster.dask-config") or {}))
        client = await Client(address, asynchronous=True, direct_to_workers=True, set_as_default=False)
        await client.register_plugin(ModelRegistry())
        # Every worker, present or joining later, gets the comm ops the model actors are reached by.
        await client.register_plugin(XdaskWorkerPlugin())
        return cls(client, watch=watch)

    @property
    def scheduler(self) -> Any:
        """The scheduler's RPC: the registry's ``xdask_*`` handlers and Dask's own (``identity``)."""
        return scheduler_of(self.client)

    async def close(self) -> None:
        await self.recovery.stop()
        await self.client.close()

    # -- catalog of running models ---------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        records = await self.scheduler.xdask_models()
        self.router.refresh(records)
        return records

    async def get_model(self, uid: str) -> dict[str, Any]:
        """The model's registry record, read now (404 if unknown)."""
        return await self.router.record(uid, fresh=True)

    async def describe_model(self, uid: str) -> dict[str, Any]:
        """The record with each replica's live load: its actor's in-flight count and ours."""
        return await self._with_load(await self.get_model(uid))

    async def describe_models(self) -> list[dict[str, Any]]:
        """Every model as ``describe_model`` gives it: one scheduler call, then one call per replica."""
        records = await self.list_models()
        await asyncio.gather(*(self._with_load(r) for r in records))
        return records

    async def _with_load(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add ``load`` (in flight here and on the actor) and the actor's engine facts to each replica."""
        live = await asyncio.gather(*(describe_replica(self.client, r) for r in record["replicas"]))
        for rep, info in zip(record["replicas"], live, strict=True):
            rep["load"] = {
                "outstanding": self.router.outstanding.get(rep.get("actor_key") or "", 0),
                "in_flight": info.get("in_flight") if info else None,
            }
            if info:
                rep["engine"] = info
        return record

    def cached_records(self) -> list[dict[str, Any]]:
        """The registry records as this server last read them (no call; refreshed by the watch loop)."""
        return list(self.router.records().values())

    def knows(self, uid: str) -> bool:
        """Whether ``uid`` is a model this server knows of now (no call): bounds metric labels."""
        return self.router.knows(uid)

    async def replica_stats(self, timeout: float | None = None) -> dict[str, Any]:
        """Each replica's live figures from its worker (``ModelRegistry.replica_stats``), within ``timeout``.

        ``timeout`` (default ``xdask.metrics.worker-timeout``) bounds each
        worker's answer; the scheduler call itself gets one more second.
        """
        wait = float(config.get("metrics.worker-timeout") if timeout is None else timeout)
        return await asyncio.wait_for(self.scheduler.xdask_replica_stats(timeout=wait), wait + 1.0)

    def known_models(self) -> list[str]:
        """The uids of the models this server knows of now, without asking the scheduler.

        The watch loop refreshes this view every ``cluster.watch-interval``;
        the request statistics use it to forget models that are gone.
        """
        return self.router.uids()

    async def record(self, uid: str) -> dict[str, Any]:
        """The registry record of model ``uid`` as routing sees it (cached for 2 s; 404 if unknown).

        The request path reads it once per request and hands it on.
        """
        return await self.router.record(uid)

    # -- cluster views --------------------------------------------------------

    async def workers(self) -> list[dict[str, Any]]:
        """``GET /v1/cluster/workers``: every worker's resources, GPUs, replicas and memory."""
        return await self.scheduler.xdask_workers()

    async def dask_dashboard_link(self) -> str | None:
        """The URL of Dask's own dashboard for this cluster, or None when it does not run.

        Why not ``Client.dashboard_link``: a scheduler always runs an HTTP
        server (``/health``, ``/metrics``) and lists it as its ``dashboard``
        service even when the Bokeh dashboard is off, so the port alone does not
        say whether there is a dashboard; the scheduler is asked once (cached
        for a minute: a cluster's dashboard does not come and go).
        """
        now = time.monotonic()
        if self._dask_dashboard is not None and now - self._dask_dashboard[0] < 60.0:
            return self._dask_dashboard[1]
        try:
            port = await asyncio.wait_for(self.client.run_on_scheduler(_dashboard_port),
                                          float(config.get("cluster.call-timeout")))
        except (OSError, TimeoutError) as exc:
            logger.debug("Cannot ask the scheduler for its dashboard: %s", exc)
            return self._dask_dashboard[1] if self._dask_dashboard else None
        link = None
        if port:
            host = self.scheduler.address.split("://")[-1].rsplit(":", 1)[0]
            link = format_dashboard_link(host, port)
        self._dask_dashboard = (now, link)
        return link

    async def health(self) -> dict[str, Any]:
        """``GET /v1/cluster/health``: ``ok`` when the scheduler, workers and every replica are fine.

        A replica that is not ready is a problem (with its error: a failed
        launch, a dead worker, failed health checks), and so is a ready one
        that failed its last health probes (``failed_probes`` of
        ``xdask.health-check.attempts``). ``health_check`` says whether the
        health check and relaunches run.
        """
        timeout = float(config.get("health-check.timeout"))
        disabled = bool(config.get("health-check.disable"))
        attempts = int(config.get("health-check.attempts"))
        try:
            identity = await asyncio.wait_for(self.scheduler.identity(), timeout)
            records = await asyncio.wait_for(self.scheduler.xdask_models(), timeout)
        except (OSError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {timeout:g} s"
            return {"status": "down", "scheduler": self.scheduler.address, "workers": 0, "models": {},
                    "ready_models": 0, "health_check": not disabled, "problems": [f"scheduler unreachable: {why}"]}
        self.router.refresh(records)
        problems = []
        workers = identity.get("workers", {})
        if not workers:
            problems.append("no workers")
        states: dict[str, int] = {}
        for record in records:
            states[record["state"]] = states.get(record["state"], 0) + 1
            for rep in record["replicas"]:
                where = f"{record['model_uid']} replica {rep['replica_id']}"
                if rep["state"] != "ready" and record["state"] != "launching":
                    relaunch = ""
                    if rep["state"] == "lost" and (disabled or not record.get("restart_on_failure")):
                        relaunch = ", not relaunched: " + ("the health check is disabled" if disabled
                                                          else "restart_on_failure is off")
                    problems.append(f"{where} is {rep['state']}"
                                    + (f" ({rep['error']}{relaunch})" if rep.get("error") else
                                       f" ({relaunch[2:]})" if relaunch else ""))
                elif rep.get("failed_probes"):
                    problems.append(f"{where} failed {rep['failed_probes']} of {attempts} health checks in a row")
        return {"status": "ok" if not problems else "degraded", "scheduler": identity.get("address"),
                "workers": len(workers), "models": states, "ready_models": states.get("ready", 0)
                + states.get("degraded", 0), "health_check": not disabled, "problems": problems}

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
        family = find_family(model_name)
        return family_matrix(family, list((await self.host_facts()).values()))

    async def _excluded(self, engine: str, model_format: str, model_type: str = "LLM") -> dict[str, str]:
        """Workers that cannot run ``engine`` on ``model_format`` (a ``model_type`` model), with why.

        Workers not known yet are allowed.
        """
        hosts = await self.host_facts()
        return {a: r for a, h in hosts.items() if (r := why_not(engine, model_format, h, model_type)) is not None}

    async def _excluded_for(self, record: dict[str, Any]) -> dict[str, str]:
        spec = record["spec"]
        return await self._excluded(spec["model_engine"], spec["model_format"], spec.get("model_type") or "LLM")

    async def gpu_free(self) -> dict[str, dict[int, int]]:
        """Free bytes per GPU label of each worker that has GPUs, read now (not cached: it moves)."""
        identity = await self.scheduler.identity()
        with_gpus = [a for a, w in identity.get("workers", {}).items() if (w.get("resources") or {}).get("GPU")]
        if not with_gpus:
            return {}
        try:
            found = await asyncio.wait_for(
                self.client.run(gpu_free_memory, workers=with_gpus, on_error="return"),
                float(config.get("cluster.call-timeout")),
            )
        except (OSError, TimeoutError):
            return {}
        return {a: v for a, v in found.items() if isinstance(v, dict) and v}

    # -- model cache (every worker has its own XDASK_HOME/cache) -------------

    async def cached_models(self, model_name: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/cache/models``: each worker's cache folders, complete or not, with its address."""
        found = await asyncio.wait_for(self.client.run(list_cached, model_name, on_error="return"),
                                       float(config.get("cluster.call-timeout")))
        out = []
        for address, entries in sorted(found.items()):
            if isinstance(entries, BaseException):
                logger.warning("Cannot list the cache of %s: %s", address, entries)
                continue
            for entry in entries:
                out.append({**entry, "address": address, "worker_ip": _host(address), "actor_ip_address": address})
        return out

    async def remove_cached(self, model_version: str) -> list[dict[str, Any]]:
        """``DELETE /v1/cache/models``: remove ``model_version`` from every worker's cache.

        Refused (409) while a model uses it, on any worker: workers of one
        machine share its disk. 404 when no worker had it. Returns, per
        worker that removed something, its address and the removed paths.
        """
        check_model_version(model_version)
        users = await self._cache_users(model_version)
        if users:
            raise ConflictError(
                f"Cached model {model_version} is in use by {', '.join(users)}; terminate it first",
                param="model_version", code="model_in_use",
            )
        found = await asyncio.wait_for(self.client.run(_remove_cached_here, model_version, on_error="return"),
                                       float(config.get("cluster.call-timeout")))
        removed, failed = [], []
        for address, paths in sorted(found.items()):
            if isinstance(paths, BaseException):
                failed.append(f"{address}: {paths}")
            elif paths:
                removed.append({"address": address, "worker_ip": _host(address), "paths": paths})
        if failed:
            raise XdaskError(f"Could not remove {model_version} everywhere: " + "; ".join(failed))
        if not removed:
            raise NotFoundError(f"No worker has {model_version!r} in its cache", param="model_version",
                                code="cache_not_found")
        logger.info("Removed %s from the cache of %s", model_version, ", ".join(r["address"] for r in removed))
        return removed

    async def _cache_users(self, model_version: str) -> list[str]:
        """The replicas (``uid/replica_id``) whose files are in cache folder ``model_version``.

        A ready replica says where its files are (the actor's ``model_path``);
        one still loading may be filling the folder its spec names.
        """
        users = []
        for record in await self.describe_models():
            spec = record["spec"]
            for rep in record["replicas"]:
                path = (rep.get("engine") or {}).get("model_path")
                if path:
                    used = model_version in pathlib.PurePath(path).parts
                else:
                    used = _spec_cache_folder(spec) == model_version
                if used:
                    users.append(f"{record['model_uid']}/{rep['replica_id']}")
        return users

    # -- launch / terminate ----------------------------------------------

    async def launch(self, request: LaunchModelRequest | dict[str, Any]) -> str:
        """Place and load every replica of a model; returns its uid once all serve.

        If any replica fails to load, the others are stopped and the launch
        fails with that replica's error: a launch is all or nothing.
        """
        if not isinstance(request, LaunchModelRequest):
            try:
                request = LaunchModelRequest.model_validate(request)
            except pydantic.ValidationError as exc:
                raise validation_error(exc) from None
        try:
            uid = await self._launch(request)
        except BaseException:
            self.launches["failed"] += 1
            raise
        self.launches["ok"] += 1
        return uid

    async def _launch(self, request: LaunchModelRequest) -> str:
        model_name = request.model_name
        model_type = normalize_model_type(request.model_type or "LLM")
        resolved = resolve(
            model_name,
            request.model_format,
            request.model_size_in_billions,
            request.quantization,
            model_type=model_type,
        )
        placement = PlacementRequest.from_launch(request.model_dump())
        hosts = await self.host_facts()
        identity = await self.scheduler.identity()
        if set(identity.get("workers", {})) - set(hosts):  # a worker joined since: ask again
            hosts = await self.host_facts(refresh=True)
        engine = check_engine(resolved, request.model_engine, list(hosts.values()))
        uid = request.model_uid or model_name
        engine_kwargs = request.engine_kwargs()
        # Reads GGUF metadata or config.json from this machine's disk (never downloads): off the loop.
        placement.memory_bytes = await asyncio.to_thread(
            estimate_replica_bytes, resolved, placement.n_gpu != 0, engine=engine,
            engine_kwargs=engine_kwargs, model_path=request.model_path,
        )
        family = resolved.family
        spec = {
            "model_name": family.model_name,
            "model_type": family.model_type,
            "model_engine": engine,
            "model_format": resolved.spec.model_format,
            "model_size_in_billions": resolved.spec.model_size_in_billions,
            "quantization": resolved.quantization,
            "model_ability": family.model_ability,
            "model_lang": family.model_lang,
            "model_description": family.model_description,
            "model_family": family.model_family or family.model_name,
            "context_length": getattr(family, "context_length", None),
            "engine_kwargs": engine_kwargs,
            # Concurrent requests to this model each server admits (None: no limit); more get 429.
            "request_limits": request.request_limits,
            # Type-specific facts clients read from GET /v1/models/{uid} (dimensions, max_tokens, ...).
            **type_facts(family),
        }
        launch = {
            "resolved": resolved.model_dump(mode="json"),
            "model_engine": engine,
            "model_path": request.model_path,
            "engine_kwargs": engine_kwargs,
            "allow_shared_gpu": placement.allow_shared_gpu,
            # Checked here so that a wrong name fails the launch before any replica is placed.
            "download_hub": preferred_hub(request.download_hub) if request.download_hub else None,
            # Requests each replica holds beyond its engine's slots (None: no bound), fixed for the model's life.
            "replica_queue": config.get("limits.replica-queue"),
        }
        restart = request.restart_on_failure
        placed = await self.scheduler.xdask_place(
            uid=uid, spec=spec, launch=launch, placement=placement.to_dict(),
            restart_on_failure=bool(config.get("cluster.restart-on-failure") if restart is None else restart),
            excluded=await self._excluded(engine, resolved.spec.model_format, resolved.family.model_type),
            gpu_free=await self.gpu_free() if placement.n_gpu != 0 else None,
        )
        if not placed["ok"]:
            raise from_wire(placed["error"])
        results = await asyncio.gather(
            *(start_replica(self.client, uid, rep, launch) for rep in placed["replicas"]), return_exceptions=True
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self._discard(uid)
            if isinstance(failure, XdaskError) or not isinstance(failure, Exception):
                raise failure
            raise XdaskError(f"Failed to launch {model_name}: {failure}") from failure
        logger.info("Launched %s (%s) with %d replica(s)", uid, engine, len(results))
        return uid

    async def _discard(self, uid: str) -> None:
        """Stop whatever replicas of ``uid`` started and forget it."""
        record = await self.scheduler.xdask_model(uid=uid)
        if record is not None:
            await asyncio.gather(*(shutdown_replica(self.client, r) for r in record["replicas"]))
        await self.scheduler.xdask_remove_model(uid=uid)
        self.router.forget(uid)

    async def terminate(self, uid: str) -> None:
        """Free the model's memory and GPUs on its worker(s) and forget it."""
        await self.get_model(uid)
        await self._discard(uid)
        logger.info("Terminated %s", uid)

    async def terminate_all(self) -> None:
        """Terminate every model (used when an embedded cluster shuts down)."""
        for record in await self.list_models():
            await self.terminate(record["model_uid"])

    # -- launch progress and cancel (the workers hold both: xdask.hub.progress) ----

    async def launch_progress(self, uid: str) -> dict[str, Any]:
        """``GET /v1/models/{uid}/progress``: state, download bytes and share per replica (404 if unknown)."""
        record = await self.get_model(uid)
        addresses = sorted({r["address"] for r in record["replicas"]
                            if r["state"] in LAUNCHING_STATES and r.get("address")})
        reports: dict[str, Any] = {}
        if addresses:
            try:
                reports = await asyncio.wait_for(
                    self.client.run(worker_progress, uid, workers=addresses, on_error="return"),
                    float(config.get("cluster.call-timeout")))
            except (OSError, TimeoutError) as exc:
                logger.debug("Cannot read the launch progress of %s: %s", uid, exc)
        return launch_report(record, reports)

    async def cancel_launch(self, uid: str) -> dict[str, Any]:
        """``POST /v1/models/{uid}/cancel``: stop a launch; the launch request then fails with ``launch_cancelled``.

        A download stops at its next chunk (its partial files stay for a later
        launch to resume; the cache folder gets no manifest); an engine that is
        loading finishes and is closed. Waits up to ``launch.cancel-wait``
        seconds for the uid to be free and says whether it is
        (``cancelled``) or not yet (``cancelling``). 400 when not launching.
        """
        record = await self.get_model(uid)
        if record["state"] != "launching":
            raise InvalidRequestError(f"Model {uid} is not launching (it is {record['state']}); "
                                      f"stop it with DELETE /v1/models/{uid}", param="model_uid",
                                      code="not_launching")
        targets: dict[str, list[tuple[int, float | None]]] = {}
        for rep in record["replicas"]:
            if rep["state"] in LAUNCHING_STATES and rep.get("address"):
                targets.setdefault(rep["address"], []).append((rep["replica_id"], rep.get("since")))
        timeout = float(config.get("cluster.call-timeout"))
        await asyncio.gather(*(
            asyncio.wait_for(self.client.run(worker_cancel, uid, reps, workers=[addr], on_error="return"), timeout)
            for addr, reps in targets.items()), return_exceptions=True)
        logger.info("Cancelling the launch of %s", uid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(config.get("launch.cancel-wait"))
        while loop.time() < deadline:
            current = await self.scheduler.xdask_model(uid=uid)
            if current is None or current.get("created") != record.get("created"):
                return {"model_uid": uid, "state": "cancelled"}
            await asyncio.sleep(0.1)
        return {"model_uid": uid, "state": "cancelling"}


def _host(address: str) -> str:
    """``tcp://10.0.0.2:40123`` -> ``10.0.0.2`` (Xinference's ``worker_ip``)."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _remove_cached_here(model_version: str) -> list[str]:
    """Run on a worker: remove ``model_version`` from its cache; [] when it has none."""
    try:
        return remove_cached(model_version)
    except NotFoundError:
        return []


def _spec_cache_folder(spec: dict[str, Any]) -> str | None:
    """The cache folder name a running model's spec loads from (None: its family is gone)."""
    from xdask.hub.locate import cache_dir

    try:
        resolved = resolve(spec["model_name"], spec.get("model_format"), spec.get("model_size_in_billions"),
                           spec.get("quantization"), model_type=spec.get("model_type") or "LLM")
    except XdaskError:
        return None
    return cache_dir(resolved).name


def _dashboard_port(dask_scheduler: Any) -> int | None:
    """Run on the scheduler: its dashboard's port when the Bokeh dashboard is mounted, else None."""
    http_app = getattr(dask_scheduler, "http_application", None)
    server = getattr(dask_scheduler, "http_server", None)
    if http_app is None or server is None or not getattr(http_app, "applications", None):
        return None  # only the plain routes (health, metrics): no dashboard
    return int(server.port)
