"""Download progress and cancellation of model launches, kept in the worker process.

A ``LaunchProgress`` is what one replica's launch reports while its actor's
constructor runs: the phase (``locating``, ``downloading``, ``loading``),
bytes done and total per file, and a cancel flag the download checks at
every chunk. Each worker process keeps the live ones on a board; a server
reads and flags them with ``client.run`` on the replica's worker
(``worker_progress``, ``worker_cancel``).

Why a pull from the worker rather than Dask's events: the events API keeps
every topic's messages for the life of the scheduler (FACTS.md), and a
progress tick per chunk is not worth keeping; nothing is sent while nobody
asks.

A launch is named by ``(uid, replica_id, since)``: ``since`` is the time the
registry placed the replica, so a cancel meant for one launch can never stop
a later launch of the same uid, and a cancel that reaches the worker before
the actor started is kept until the actor registers.

Examples
--------
>>> p = LaunchProgress("m1", 0, since=1.0)
>>> p.start_files({"a.gguf": 10})
>>> p.advance("a.gguf", 4)
>>> p.snapshot()["downloaded_bytes"]
4
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from xdask.errors import DownloadCancelledError

#: Pending cancels older than this (seconds) are forgotten: their launch never reached this worker.
_PENDING_TTL = 3600.0

_lock = threading.Lock()
_active: dict[tuple[str, int, float | None], LaunchProgress] = {}
_pending_cancel: dict[tuple[str, int, float | None], float] = {}


class LaunchProgress:
    """One launch's phase, bytes per file and cancel flag (thread-safe).

    ``listener`` (optional) is called with ``snapshot()`` after every change:
    in-process callers (tests, notebooks) watch a download with it.
    """

    def __init__(self, uid: str = "", replica_id: int = 0, since: float | None = None,
                 listener: Callable[[dict[str, Any]], None] | None = None):
        self.uid = uid
        self.replica_id = replica_id
        self.since = since
        self.phase = "locating"
        self.hub: str | None = None
        self.model_id: str | None = None
        self.started = time.time()
        self._files: dict[str, list[int]] = {}  # name -> [done, total]
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._listener = listener

    # -- reported by the download --------------------------------------------

    def set_phase(self, phase: str, hub: str | None = None, model_id: str | None = None) -> None:
        self.phase = phase
        if hub is not None:
            self.hub, self.model_id = hub, model_id
        self._notify()

    def start_files(self, sizes: dict[str, int]) -> None:
        """The files about to be fetched and their sizes; starts the ``downloading`` phase."""
        with self._lock:
            self._files = {name: [0, int(size)] for name, size in sizes.items()}
        self.phase = "downloading"
        self._notify()

    def advance(self, name: str, nbytes: int) -> None:
        """``nbytes`` more of ``name`` arrived (negative when a restart threw bytes away)."""
        with self._lock:
            entry = self._files.setdefault(name, [0, 0])
            entry[0] = max(0, entry[0] + nbytes)
        self._notify()

    def set_done(self, name: str, done: int) -> None:
        """``name`` holds ``done`` bytes now (a resumed partial file, a finished one)."""
        with self._lock:
            entry = self._files.setdefault(name, [0, 0])
            entry[0] = max(0, int(done))
        self._notify()

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener(self.snapshot())

    # -- cancellation -----------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise ``DownloadCancelledError`` once the launch was cancelled."""
        if self._cancel.is_set():
            raise DownloadCancelledError(f"The launch of {self.uid or 'the model'} was cancelled")

    # -- read ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """``{"replica_id", "phase", "hub", "model_id", "downloaded_bytes", "total_bytes", "files", ...}``."""
        with self._lock:
            files = [{"name": n, "downloaded_bytes": d, "total_bytes": t} for n, (d, t) in self._files.items()]
            done = sum(d for d, _ in self._files.values())
            total = sum(t for _, t in self._files.values())
        return {
            "model_uid": self.uid, "replica_id": self.replica_id, "since": self.since, "phase": self.phase,
            "hub": self.hub, "model_id": self.model_id, "downloaded_bytes": done, "total_bytes": total,
            "files": files, "cancelled": self.cancelled, "elapsed": round(time.time() - self.started, 3),
        }


def register(uid: str, replica_id: int, since: float | None) -> LaunchProgress:
    """Put a launch on this process's board (cancelled at once if a cancel for it came first)."""
    progress = LaunchProgress(uid, replica_id, since)
    key = (uid, replica_id, since)
    with _lock:
        _active[key] = progress
        if _pending_cancel.pop(key, None) is not None:
            progress.cancel()
    return progress


def unregister(progress: LaunchProgress) -> None:
    with _lock:
        key = (progress.uid, progress.replica_id, progress.since)
        if _active.get(key) is progress:
            del _active[key]


def worker_progress(uid: str) -> list[dict[str, Any]]:
    """Run on a worker (``client.run``): the live launches of ``uid`` there."""
    with _lock:
        found = [p for (u, _, _), p in _active.items() if u == uid]
    return [p.snapshot() for p in found]


def worker_cancel(uid: str, replicas: list[tuple[int, float | None]]) -> int:
    """Run on a worker: flag the launches ``(replica_id, since)`` of ``uid``; returns how many ran.

    A launch not on the board yet (its actor has not started) is flagged
    when it registers.
    """
    now = time.time()
    hit = 0
    with _lock:
        for key, stamp in list(_pending_cancel.items()):
            if now - stamp > _PENDING_TTL:
                del _pending_cancel[key]
        for replica_id, since in replicas:
            key = (uid, int(replica_id), since)
            progress = _active.get(key)
            if progress is None:
                _pending_cancel[key] = now
            else:
                progress.cancel()
                hit += 1
    return hit


#: Replica states of the registry in which a launch runs (and can be watched or cancelled).
LAUNCHING_STATES = ("launching", "relaunching")


def launch_report(record: dict[str, Any], reports: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/models/{uid}/progress``: a registry record merged with its workers' ``worker_progress``.

    ``reports`` maps a worker address to what ``worker_progress`` returned
    there (or an exception). A replica's ``state`` is the registry's
    (``ready``, ``lost``) or, while it launches, the phase its worker
    reports: ``starting`` (actor not running yet), ``locating``,
    ``waiting`` (another process fetches the same files), ``downloading``,
    ``loading``. ``progress`` is the share of the download done, 1.0 once
    the files are local.
    """
    replicas = []
    for rep in record["replicas"]:
        entry: dict[str, Any] = {"replica_id": rep["replica_id"], "address": rep.get("address"),
                                 "state": rep["state"], "downloaded_bytes": 0, "total_bytes": 0, "files": [],
                                 "hub": None, "model_id": None, "error": rep.get("error")}
        if rep["state"] in LAUNCHING_STATES:
            found = reports.get(rep.get("address") or "")
            snap = next((s for s in found if s.get("replica_id") == rep["replica_id"]
                         and s.get("since") == rep.get("since")), None) if isinstance(found, list) else None
            entry["state"] = snap["phase"] if snap else "starting"
            if snap:
                entry.update({k: snap[k] for k in ("downloaded_bytes", "total_bytes", "files", "hub", "model_id")})
        total = entry["total_bytes"]
        entry["progress"] = _share(entry["downloaded_bytes"], total, entry["state"])
        replicas.append(entry)
    phases = [r["state"] for r in replicas]
    if record["state"] in ("ready", "degraded", "lost") and not any(p in _ACTIVE_PHASES for p in phases):
        state = record["state"]
    else:
        state = next((p for p in _ACTIVE_PHASES if p in phases), record["state"])
    done = sum(r["downloaded_bytes"] for r in replicas)
    total = sum(r["total_bytes"] for r in replicas)
    return {"model_uid": record["model_uid"], "state": state, "progress": _share(done, total, state),
            "downloaded_bytes": done, "total_bytes": total,
            "files": [f for r in replicas for f in r["files"]], "replicas": replicas}


#: Launch phases, the one shown for a whole model first: the slowest step still running.
_ACTIVE_PHASES = ("downloading", "waiting", "locating", "starting", "loading")


def _share(done: int, total: int, state: str) -> float:
    if total > 0:
        return round(min(1.0, done / total), 4)
    return 1.0 if state in ("ready", "loading", "degraded") else 0.0
