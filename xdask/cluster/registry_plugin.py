"""``ModelRegistry``: the scheduler plugin that is the single source of truth.

It holds, for every model uid, its spec, the launch recipe and, per
replica, the worker address, GPU indices, actor key, state and history. Any
process with a Dask client reads it with ``await client.scheduler.xdask_models()``
(~0.3 ms), so a second or restarted server, or a notebook, sees the same
models. Holding the actor keys here (as a pseudo client that "wants" them)
keeps actors alive after the launching client disconnects.

Placement runs here too: Dask resources do not pin actors, so GPU indices
are booked by this plugin, and choosing and booking happen in one handler
call on the scheduler's event loop, so two launches can never race for one
index. When a worker dies, ``remove_worker`` marks its replicas lost within
milliseconds; a server relaunches them through ``xdask_claim_relaunch``.

The health check runs here too, once per cluster whatever the number of
servers: every ``xdask.health-check.interval`` seconds it asks each worker
with ready replicas for its actors' figures (``xdask_replica_stats``, one
small message per worker, with the interval as timeout); a replica missing
from the answers ``xdask.health-check.attempts`` times in a row (a hung
worker or actor, which Dask notices only after its worker TTL) is marked
lost like a dead worker's, and relaunched by a server if its model says
``restart_on_failure``. ``xdask.health-check.disable`` turns the probes off.
The same collection answers ``xdask_replica_stats`` for ``/metrics``.

Examples
--------
>>> from distributed import Client                             # doctest: +SKIP
>>> client = Client("tcp://scheduler:8786")
>>> client.register_plugin(ModelRegistry())
>>> client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["xdask-registry"].records)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import Counter, deque
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from xdask import config
from xdask.cluster.placement import PlacementRequest, WorkerView, place_replicas
from xdask.errors import ConflictError, XdaskError

logger = logging.getLogger(__name__)

PLUGIN_NAME = "xdask-registry"
#: The pseudo client under which the registry holds actor keys.
HOLDER = "xdask-registry"
#: Replica states that hold their worker's GPU indices.
_BOOKING_STATES = {"launching", "ready", "relaunching"}
_HISTORY = 200


def model_state(record: dict[str, Any]) -> str:
    """A model's state from its replicas'.

    ``ready``: every replica serves; ``degraded``: some do; ``launching``:
    none yet, first launch; ``lost``: none, after a failure.
    """
    states = [r["state"] for r in record["replicas"]]
    ready = states.count("ready")
    if ready == len(states):
        return "ready"
    if ready:
        return "degraded"
    if all(s == "launching" for s in states) and not record.get("was_ready"):
        return "launching"
    return "lost"


def _error(exc: XdaskError) -> dict[str, Any]:
    """A handler's refusal: ``{"ok": False, "error": <wire>}`` (the caller raises ``errors.from_wire``)."""
    return {"ok": False, "error": exc.to_wire()}


class ModelRegistry(SchedulerPlugin):
    """Scheduler-side registry of running models, replicas and booked GPUs.

    A record is ``{"model_uid", "state", "spec", "launch", "placement",
    "restart_on_failure", "replicas": [{"replica_id", "address", "gpu_idx",
    "actor_key", "state", "engine", "attempts", "since", "error"}],
    "history": [...], "created"}``; replica states are ``launching``,
    ``ready``, ``lost`` and ``relaunching``.
    """

    name = PLUGIN_NAME
    idempotent = True  # a second server registering it must not wipe the state

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=_HISTORY)
        #: How many times each event (placed, ready, relaunched, launch_failed, lost, unhealthy, ...) happened.
        self.event_counts: Counter[str] = Counter()
        self.scheduler: Any = None
        self._health_task: asyncio.Task[None] | None = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        if not config.get("health-check.disable") and self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name="xdask-health-check")
        scheduler.handlers.update(
            {
                "xdask_place": self.place,
                "xdask_replica_ready": self.replica_ready,
                "xdask_replica_failed": self.replica_failed,
                "xdask_claim_relaunch": self.claim_relaunch,
                "xdask_remove_model": self.remove,
                "xdask_models": self.models,
                "xdask_model": self.model,
                "xdask_gpu_bookings": self.gpu_bookings,
                "xdask_workers": self.workers,
                "xdask_cluster_events": self.cluster_events,
                "xdask_replica_stats": self.replica_stats,
            }
        )

    async def close(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- placement and launch --------------------------------------------

    def _worker_views(self, gpu_free: dict[str, dict[int, int]] | None) -> dict[str, WorkerView]:
        views = {}
        for addr, ws in self.scheduler.workers.items():
            views[addr] = WorkerView(
                address=addr,
                gpus=int((ws.resources or {}).get("GPU", 0)),
                memory_limit=int(ws.memory_limit or 0),
                memory_used=int(ws.memory.process),
                gpu_free={int(k): int(v) for k, v in ((gpu_free or {}).get(addr) or {}).items()},
                running=ws.status.name in ("running", "paused"),
            )
        return views

    def _bookings(self, skip: tuple[str, int] | None = None) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for uid, record in self.records.items():
            for rep in record["replicas"]:
                if rep["state"] in _BOOKING_STATES and (uid, rep["replica_id"]) != skip and rep["address"]:
                    for i in rep.get("gpu_idx") or []:
                        out.setdefault(rep["address"], {})[i] = f"{uid}/{rep['replica_id']}"
        return out

    def _replicas_per_worker(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for record in self.records.values():
            for rep in record["replicas"]:
                if rep["state"] in _BOOKING_STATES and rep["address"]:
                    out[rep["address"]] = out.get(rep["address"], 0) + 1
        return out

    def place(
        self,
        uid: str,
        spec: dict[str, Any],
        launch: dict[str, Any],
        placement: dict[str, Any],
        restart_on_failure: bool = True,
        excluded: dict[str, str] | None = None,
        gpu_free: dict[str, dict[int, int]] | None = None,
    ) -> dict[str, Any]:
        """Choose and book every replica of a new model in one step; the record starts ``launching``."""
        if uid in self.records:
            return _error(ConflictError(f"Model uid {uid!r} is already in use", param="model_uid"))
        req = PlacementRequest(**placement)
        try:
            chosen = place_replicas(
                self._worker_views(gpu_free), self._bookings(), self._replicas_per_worker(), req, excluded=excluded
            )
        except XdaskError as exc:
            return _error(exc)
        now = time.time()
        replicas = [
            {"replica_id": i, "address": p.address, "gpu_idx": p.gpu_idx, "actor_key": None, "state": "launching",
             "engine": None, "attempts": 1, "since": now, "error": None}
            for i, p in enumerate(chosen)
        ]
        self.records[uid] = {
            "model_uid": uid, "state": "launching", "spec": spec, "launch": launch, "placement": placement,
            "restart_on_failure": bool(restart_on_failure), "replicas": replicas, "history": [],
            "created": now, "was_ready": False,
        }
        for i, p in enumerate(chosen):
            self._note(uid, i, "placed", f"{p.address} GPU {p.gpu_idx}")
        return {"ok": True, "replicas": copy.deepcopy(replicas)}

    def replica_ready(self, uid: str, replica_id: int, actor_key: str, engine: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        """A replica's actor loaded: the registry holds it from now on."""
        rep = self._replica(uid, replica_id)
        if rep is None:
            return {"ok": False, "message": f"Model uid {uid!r} was removed while launching"}
        if rep["state"] not in ("launching", "relaunching"):
            return {"ok": False, "message": f"Replica {uid}/{replica_id} is {rep['state']}, not launching"}
        rep.update(actor_key=actor_key, engine=engine, state="ready", since=time.time(), error=None)
        self.scheduler.client_desires_keys(keys=[actor_key], client=HOLDER)
        record = self.records[uid]
        relaunched = record["was_ready"]
        record["was_ready"] = True
        self._note(uid, replica_id, "relaunched" if relaunched else "ready", rep["address"])
        self._refresh(record)
        return {"ok": True}

    def replica_failed(self, uid: str, replica_id: int, error: str) -> dict[str, Any]:
        """A replica's (re)launch failed: it becomes ``lost`` and frees its GPUs."""
        rep = self._replica(uid, replica_id)
        if rep is None:
            return {"ok": False}
        rep.update(state="lost", error=error, since=time.time(), actor_key=None)
        self._note(uid, replica_id, "launch_failed", error)
        self._refresh(self.records[uid])
        return {"ok": True}

    def claim_relaunch(
        self,
        uid: str,
        replica_id: int,
        excluded: dict[str, str] | None = None,
        gpu_free: dict[str, dict[int, int]] | None = None,
        lease: float = 1800.0,
    ) -> dict[str, Any]:
        """Place a lost replica again, if it still needs it; only one caller wins.

        A ``relaunching`` claim older than ``lease`` seconds (its server died
        mid-launch) may be taken over.
        """
        record = self.records.get(uid)
        rep = self._replica(uid, replica_id)
        if record is None or rep is None or not record["restart_on_failure"]:
            return {"ok": False, "message": "nothing to relaunch"}
        stale = rep["state"] == "relaunching" and time.time() - rep["since"] > lease
        if rep["state"] != "lost" and not stale:
            return {"ok": False, "message": f"replica is {rep['state']}"}
        placement = dict(record["placement"])
        if placement.get("worker_address") and placement["worker_address"] not in self.scheduler.workers:
            placement["worker_address"] = None  # the pinned worker died; any worker with room will do
        placement["gpu_idx"] = placement.get("gpu_idx") if placement.get("worker_address") else None
        if record["placement"].get("gpu_idx") and placement["gpu_idx"] is None:
            placement["n_gpu"] = len(record["placement"]["gpu_idx"])
        req = PlacementRequest(**placement)
        same: dict[str, int] = {}
        for other in record["replicas"]:
            if other is not rep and other["state"] in _BOOKING_STATES:
                same[other["address"]] = same.get(other["address"], 0) + 1
        try:
            (chosen,) = place_replicas(
                self._worker_views(gpu_free), self._bookings(skip=(uid, replica_id)), self._replicas_per_worker(),
                req, count=1, same_model_on=same, excluded=excluded,
            )
        except XdaskError as exc:
            if rep.get("waiting") != exc.message:  # say it once, not every retry
                rep["waiting"] = exc.message
                self._note(uid, replica_id, "waiting_for_room", exc.message)
            return _error(exc)
        rep["waiting"] = None
        rep.update(address=chosen.address, gpu_idx=chosen.gpu_idx, state="relaunching", since=time.time(),
                   attempts=rep["attempts"] + 1, actor_key=None)
        self._note(uid, replica_id, "relaunching", f"{chosen.address} GPU {chosen.gpu_idx} (attempt {rep['attempts']})")
        self._refresh(record)
        return {"ok": True, "replica": copy.deepcopy(rep), "launch": record["launch"]}

    def remove(self, uid: str) -> dict[str, Any] | None:
        """Forget ``uid``, release its actors and GPUs; returns the old record."""
        record = self.records.pop(uid, None)
        if record is None:
            return None
        self._release([r["actor_key"] for r in record["replicas"] if r.get("actor_key")], f"xdask-remove-{uid}")
        self.events.append({"time": time.time(), "event": "model_removed", "model_uid": uid})
        return record

    # -- reads --------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return [self._public(r) for r in self.records.values()]

    def model(self, uid: str) -> dict[str, Any] | None:
        record = self.records.get(uid)
        return None if record is None else self._public(record)

    def gpu_bookings(self) -> dict[str, list[int]]:
        """Worker address -> GPU indices taken by models."""
        return {addr: sorted(idx) for addr, idx in self._bookings().items()}

    def workers(self) -> list[dict[str, Any]]:
        """Each worker: resources, GPUs used and free, its replicas and memory."""
        bookings = self._bookings()
        out = []
        for addr, ws in self.scheduler.workers.items():
            total = int((ws.resources or {}).get("GPU", 0))
            used = sorted(bookings.get(addr, {}))
            models = [
                {"model_uid": uid, "replica_id": rep["replica_id"], "gpu_idx": rep["gpu_idx"], "state": rep["state"]}
                for uid, record in self.records.items()
                for rep in record["replicas"]
                if rep["address"] == addr and rep["state"] in _BOOKING_STATES
            ]
            out.append({
                "address": addr, "host": ws.host, "name": str(ws.name), "status": ws.status.name,
                "nthreads": ws.nthreads, "resources": dict(ws.resources or {}),
                "gpus": {"total": total, "used": used, "free": [i for i in range(total) if i not in used]},
                "models": models,
                "memory": {"limit": int(ws.memory_limit or 0), "used": int(ws.memory.process)},
                "last_seen": ws.last_seen,
            })
        return out

    def cluster_events(self) -> list[dict[str, Any]]:
        return list(self.events)

    # -- replica figures and the health check ---------------------------------

    async def _collect(self, timeout: float) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Ask every worker with ready replicas for its actors' figures, each within ``timeout``.

        Returns the figures by actor key and, for workers that did not
        answer, why.
        """
        addresses = sorted({rep["address"] for record in self.records.values() for rep in record["replicas"]
                            if rep["state"] == "ready" and rep.get("actor_key") and rep["address"]})

        async def ask(address: str) -> dict[str, dict[str, Any]]:
            return await asyncio.wait_for(self.scheduler.rpc(address).xdask_replica_stats(), timeout)

        answers = await asyncio.gather(*(ask(a) for a in addresses), return_exceptions=True)
        figures: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for address, answer in zip(addresses, answers, strict=True):
            if isinstance(answer, dict):
                figures.update(answer)
            elif isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancelled: the scheduler is closing
            elif isinstance(answer, TimeoutError):
                failed[address] = f"no answer within {timeout:.1f} s"
            else:
                failed[address] = f"{type(answer).__name__}: {answer}"
        return figures, failed

    async def replica_stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """Every replica with its actor's live figures (None when its worker did not answer), and event counts.

        What ``/metrics`` reads at scrape time: one call to the scheduler,
        one small message per worker, bounded by ``timeout``.
        """
        figures, failed = await self._collect(float(timeout))
        replicas = []
        for uid, record in self.records.items():
            for rep in record["replicas"]:
                key = rep.get("actor_key")
                replicas.append({
                    "model_uid": uid, "replica_id": rep["replica_id"], "address": rep["address"],
                    "state": rep["state"], "figures": figures.get(key) if key else None,
                    "failed_probes": rep.get("failed_probes", 0),
                })
        return {"replicas": replicas, "events": dict(self.event_counts), "unreachable": failed}

    async def _health_loop(self) -> None:
        while True:
            interval = max(0.05, float(config.get("health-check.interval")))
            await asyncio.sleep(interval)
            try:
                await self.health_round(interval, max(1, int(config.get("health-check.attempts"))))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad round must not end the health check
                logger.exception("Health check round failed")

    async def health_round(self, timeout: float, attempts: int) -> list[tuple[str, int]]:
        """Probe every ready replica once; returns the replicas marked lost by this round.

        A replica's ``failed_probes`` counts the probes it failed in a row
        (reported by ``/v1/cluster/health``); an answer resets it.
        """
        started = time.time()
        figures, failed = await self._collect(timeout)
        lost = []
        for uid, record in list(self.records.items()):
            for rep in record["replicas"]:
                key = rep.get("actor_key")
                if rep["state"] != "ready" or not key or rep["since"] > started:  # ready since: not probed
                    continue
                if key in figures:
                    rep.pop("failed_probes", None)
                    continue
                if self.records.get(uid) is not record or rep.get("actor_key") != key:
                    continue  # removed or replaced while the probes ran
                why = failed.get(rep["address"], "its actor is gone from the worker")
                count = rep["failed_probes"] = rep.get("failed_probes", 0) + 1
                logger.warning("Health check of %s/%s on %s failed (%d of %d): %s", uid, rep["replica_id"],
                               rep["address"], count, attempts, why)
                if count < attempts:
                    continue
                rep.pop("failed_probes", None)
                rep.update(state="lost", since=time.time(), actor_key=None,
                           error=f"health check failed {count} times: {why}")
                self._note(uid, rep["replica_id"], "unhealthy", f"{rep['address']}: {why}")
                self._refresh(record)
                self._release([key], f"xdask-unhealthy-{time.time()}")
                lost.append((uid, rep["replica_id"]))
        return lost

    # -- scheduler events ---------------------------------------------------

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A dead worker takes its replicas with it: mark them lost and let go of their actors."""
        keys = []
        for uid, record in self.records.items():
            for rep in record["replicas"]:
                if rep["address"] == worker and rep["state"] in _BOOKING_STATES:
                    if rep.get("actor_key"):
                        keys.append(rep["actor_key"])
                    rep.update(state="lost", since=time.time(), actor_key=None, error=f"worker {worker} left")
                    self._note(uid, rep["replica_id"], "lost", f"worker {worker} left the cluster")
                    logger.warning("Replica %s/%s lost with worker %s", uid, rep["replica_id"], worker)
            self._refresh(record)
        self.events.append({"time": time.time(), "event": "worker_removed", "address": worker})
        if keys:
            # Not from inside the scheduler's own removal of the worker: next loop turn.
            asyncio.get_running_loop().call_soon(self._release, keys, f"xdask-worker-lost-{time.time()}")

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.events.append({"time": time.time(), "event": "worker_added", "address": worker})

    # -- helpers ------------------------------------------------------------

    def _release(self, keys: list[str], stimulus_id: str) -> None:
        keys = [k for k in keys if k in self.scheduler.tasks]
        if keys:
            self.scheduler.client_releases_keys(keys=keys, client=HOLDER, stimulus_id=stimulus_id)

    def _replica(self, uid: str, replica_id: int) -> dict[str, Any] | None:
        record = self.records.get(uid)
        if record is None:
            return None
        for rep in record["replicas"]:
            if rep["replica_id"] == replica_id:
                return rep
        return None

    def _note(self, uid: str, replica_id: int | None, event: str, detail: str = "") -> None:
        record = self.records.get(uid)
        if record is None:
            return
        entry = {"time": time.time(), "replica_id": replica_id, "event": event, "detail": detail}
        self.event_counts[event] += 1
        record["history"].append(entry)
        del record["history"][:-_HISTORY]
        self.events.append({**entry, "model_uid": uid})

    def _refresh(self, record: dict[str, Any]) -> None:
        record["state"] = model_state(record)

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k != "launch"}
