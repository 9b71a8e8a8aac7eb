"""``ModelRegistry``: the scheduler plugin that is the single source of truth.

It holds, for every model uid, its spec and state and, per replica, the
worker address and actor key. Any process with a Dask client reads it with
``await client.scheduler.xdask_models()`` (~0.3 ms), so a second server or a
notebook sees the same models. Holding the actor keys here (as a pseudo
client that "wants" them) keeps actors alive after the launching client
disconnects. Dask resources do not pin actors, so GPU indices are booked
here too.

Examples
--------
>>> from distributed import Client                             # doctest: +SKIP
>>> client = Client("tcp://scheduler:8786")
>>> client.register_plugin(ModelRegistry())
>>> client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["xdask-registry"].records)
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger(__name__)

PLUGIN_NAME = "xdask-registry"
#: The pseudo client under which the registry holds actor keys.
HOLDER = "xdask-registry"


class ModelRegistry(SchedulerPlugin):
    """Scheduler-side registry of running models and booked GPUs.

    A record is ``{"model_uid", "state", "spec": {...}, "replicas": [
    {"address", "actor_key", "gpu_idx"}], "created"}`` with ``state`` one of
    ``launching``, ``ready``, ``lost``.
    """

    name = PLUGIN_NAME
    idempotent = True  # a second server registering it must not wipe the state

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "xdask_reserve_model": self.reserve,
                "xdask_model_ready": self.ready,
                "xdask_remove_model": self.remove,
                "xdask_models": self.models,
                "xdask_model": self.model,
                "xdask_gpu_bookings": self.gpu_bookings,
            }
        )

    # -- handlers (called as ``await client.scheduler.<name>(...)``) --------

    def reserve(self, uid: str, spec: dict[str, Any], replicas: list[dict[str, Any]]) -> dict[str, Any]:
        """Claim ``uid`` and its GPUs before the actor starts; fails if taken."""
        if uid in self.records:
            return {"ok": False, "reason": f"Model uid {uid!r} is already in use"}
        for rep in replicas:
            booked = self._booked(rep["address"])
            clash = booked & set(rep.get("gpu_idx") or [])
            if clash:
                return {"ok": False, "reason": f"GPU {sorted(clash)} on {rep['address']} already in use"}
        self.records[uid] = {
            "model_uid": uid,
            "state": "launching",
            "spec": spec,
            "replicas": copy.deepcopy(replicas),
            "created": time.time(),
        }
        return {"ok": True}

    def ready(self, uid: str, replicas: list[dict[str, Any]]) -> dict[str, Any]:
        """Mark ``uid`` ready with its actors; the registry now keeps them alive."""
        record = self.records.get(uid)
        if record is None:
            return {"ok": False, "reason": f"Model uid {uid!r} was removed while launching"}
        record["replicas"] = copy.deepcopy(replicas)
        record["state"] = "ready"
        keys = [r["actor_key"] for r in replicas if r.get("actor_key")]
        self.scheduler.client_desires_keys(keys=keys, client=HOLDER)
        return {"ok": True}

    def remove(self, uid: str) -> dict[str, Any] | None:
        """Forget ``uid``, release its actors and GPUs; returns the old record."""
        record = self.records.pop(uid, None)
        if record is None:
            return None
        keys = [r["actor_key"] for r in record["replicas"] if r.get("actor_key")]
        keys = [k for k in keys if k in self.scheduler.tasks]
        if keys:
            self.scheduler.client_releases_keys(keys=keys, client=HOLDER, stimulus_id=f"xdask-remove-{uid}")
        return record

    def models(self) -> list[dict[str, Any]]:
        return list(self.records.values())

    def model(self, uid: str) -> dict[str, Any] | None:
        return self.records.get(uid)

    def gpu_bookings(self) -> dict[str, list[int]]:
        """Worker address -> GPU indices taken by models."""
        out: dict[str, set[int]] = {}
        for record in self.records.values():
            for rep in record["replicas"]:
                out.setdefault(rep["address"], set()).update(rep.get("gpu_idx") or [])
        return {addr: sorted(idx) for addr, idx in out.items()}

    # -- scheduler events ---------------------------------------------------

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A dead worker takes its replicas with it: mark those models lost."""
        for record in self.records.values():
            if any(rep["address"] == worker for rep in record["replicas"]):
                record["state"] = "lost"
                logger.warning("Model %s lost with worker %s", record["model_uid"], worker)

    def _booked(self, address: str) -> set[int]:
        return set(self.gpu_bookings().get(address, []))
