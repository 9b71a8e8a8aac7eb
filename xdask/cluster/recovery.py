"""Relaunching replicas lost with a dead worker.

The scheduler plugin marks replicas ``lost`` the moment Dask removes their
worker. A server's ``Recovery`` loop reads the registry every
``xdask.cluster.watch-interval`` seconds, and for each lost replica of a
model with ``restart_on_failure`` asks the registry to place it again
(``xdask_claim_relaunch``: atomic, so with two servers only one relaunches),
then loads it like a first launch. A replica that finds no room, or fails to
load, is retried with a backoff; when a worker joins or comes back,
placement can use it again.

With ``xdask.health-check.disable`` (``XDASK_DISABLE_HEALTH_CHECK=1``) the
loop still refreshes the server's view of the registry but relaunches
nothing: lost replicas stay lost, and ``/v1/cluster/health`` and ``/readyz``
report them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from distributed import Client

from xdask import config
from xdask.cluster.replicas import scheduler_of, start_replica
from xdask.errors import XdaskError

logger = logging.getLogger(__name__)


class Recovery:
    """The watch loop of one server: refreshes the record cache and relaunches lost replicas."""

    def __init__(
        self,
        client: Client,
        on_records: Callable[[list[dict[str, Any]]], None],
        excluded_for: Callable[[dict[str, Any]], Awaitable[dict[str, str]]],
        gpu_free: Callable[[], Awaitable[dict[str, dict[int, int]]]],
    ):
        self.client = client
        self._on_records = on_records  # the supervisor's cache refresh
        self._excluded_for = excluded_for  # record -> workers that cannot run its engine, with why
        self._gpu_free = gpu_free  # worker -> free bytes per GPU label, read now
        self._task: asyncio.Task | None = None
        self._running: dict[tuple[str, int], asyncio.Task] = {}
        self._next_try: dict[tuple[str, int], tuple[float, float]] = {}  # -> (when, backoff)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None

    async def _loop(self) -> None:
        interval = float(config.get("cluster.watch-interval"))
        while True:
            try:
                records = await scheduler_of(self.client).xdask_models()
                self._on_records(records)
                self._schedule(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a scheduler hiccup must not end recovery
                logger.warning("Registry watch failed: %s", exc)
            await asyncio.sleep(interval)

    def _schedule(self, records: list[dict[str, Any]]) -> None:
        if config.get("health-check.disable"):
            return
        now = time.monotonic()
        live = set()
        for record in records:
            if not record.get("restart_on_failure"):
                continue
            for rep in record["replicas"]:
                slot = (record["model_uid"], rep["replica_id"])
                if rep["state"] != "lost":
                    continue
                live.add(slot)
                if slot in self._running or now < self._next_try.get(slot, (0.0, 0.0))[0]:
                    continue
                self._running[slot] = asyncio.ensure_future(self._relaunch(*slot))
        for slot in list(self._next_try):
            if slot not in live and slot not in self._running:
                del self._next_try[slot]

    async def _relaunch(self, uid: str, replica_id: int) -> None:
        slot = (uid, replica_id)
        try:
            record = await scheduler_of(self.client).xdask_model(uid=uid)
            if record is None:
                return
            excluded = await self._excluded_for(record)
            claim = await scheduler_of(self.client).xdask_claim_relaunch(
                uid=uid, replica_id=replica_id, excluded=excluded, gpu_free=await self._gpu_free()
            )
            if not claim.get("ok"):
                if claim.get("error"):  # no room now: try again later
                    self._backoff(slot, claim["error"].get("message", ""))
                return
            started = time.monotonic()
            await start_replica(self.client, uid, claim["replica"], claim["launch"])
            logger.warning("Relaunched %s/%s on %s in %.1f s", uid, replica_id, claim["replica"]["address"],
                           time.monotonic() - started)
            self._next_try.pop(slot, None)
        except asyncio.CancelledError:
            raise
        except (XdaskError, OSError) as exc:
            logger.warning("Relaunch of %s/%s failed: %s", uid, replica_id, exc)
            self._backoff(slot, str(exc))
        finally:
            self._running.pop(slot, None)

    def _backoff(self, slot: tuple[str, int], why: str) -> None:
        base = float(config.get("cluster.relaunch-backoff"))
        top = float(config.get("cluster.relaunch-backoff-max"))
        _, last = self._next_try.get(slot, (0.0, 0.0))
        wait = min(top, last * 2 if last else base)
        self._next_try[slot] = (time.monotonic() + wait, wait)
        logger.info("Replica %s/%s waits %.1f s before its next relaunch: %s", *slot, wait, why)
