"""Choosing the worker and GPU indices of each model replica.

Dask resources do not pin actors (FACTS.md), so placement reads the workers'
declared ``GPU`` resources and the registry's bookings and returns explicit
addresses, which the actors are submitted to with ``workers=[addr]``. It is a
pure function of its inputs; the scheduler plugin calls it and books the
result in the same step, so two launches racing can never get one index.

A launch that cannot be placed fails here, at once, with every worker's
reason, instead of waiting in Dask's queue for resources that never come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from xdask.errors import InsufficientResourcesError, InvalidRequestError


@dataclass(frozen=True)
class Placement:
    """Where one replica goes."""

    address: str
    gpu_idx: list[int]


@dataclass
class WorkerView:
    """What placement needs to know of one worker."""

    address: str
    gpus: int = 0
    #: Bytes the worker may use (Dask's memory limit; 0: unknown) and uses now.
    memory_limit: int = 0
    memory_used: int = 0
    #: Free bytes per GPU index, when the worker reported them.
    gpu_free: dict[int, int] = field(default_factory=dict)
    running: bool = True

    @property
    def host(self) -> str:
        return urlparse(self.address).hostname or self.address


@dataclass
class PlacementRequest:
    """The placement part of a launch, validated."""

    n_gpu: int | None  # None: "auto" (one GPU where there is a free one, else the CPU)
    gpu_idx: list[int] | None = None
    worker_ip: str | None = None
    worker_address: str | None = None
    replica: int = 1
    allow_shared_gpu: bool = False
    #: Estimated bytes one replica needs (0: unknown, not checked).
    memory_bytes: int = 0

    @classmethod
    def from_launch(cls, request: dict[str, Any], memory_bytes: int = 0) -> PlacementRequest:
        """Parse ``n_gpu``/``gpu_idx``/``worker_ip``/``worker_address``/``replica`` (400 on nonsense)."""
        raw = request.get("n_gpu", "auto")
        n_gpu: int | None
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "cpu")):
            n_gpu = 0
        elif isinstance(raw, str) and raw.lower() == "auto":
            n_gpu = None
        else:
            try:
                n_gpu = int(raw)
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError(
                    f"n_gpu must be a number, 'auto' or null, not {raw!r}", param="n_gpu"
                ) from exc
            if n_gpu < 0 or isinstance(raw, bool):
                raise InvalidRequestError(f"n_gpu must be a number >= 0, not {raw!r}", param="n_gpu")
        gpu_idx = request.get("gpu_idx")
        if isinstance(gpu_idx, int) and not isinstance(gpu_idx, bool):
            gpu_idx = [gpu_idx]
        if gpu_idx is not None:
            if not isinstance(gpu_idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                        for i in gpu_idx):
                raise InvalidRequestError("gpu_idx must be a list of GPU indices >= 0", param="gpu_idx")
            if len(set(gpu_idx)) != len(gpu_idx):
                raise InvalidRequestError(f"gpu_idx {gpu_idx} repeats an index", param="gpu_idx")
            if not gpu_idx:
                gpu_idx = None
        if gpu_idx is not None:
            if n_gpu not in (None, len(gpu_idx)):
                raise InvalidRequestError(
                    f"n_gpu={raw} but gpu_idx lists {len(gpu_idx)} GPU(s); give one of them", param="gpu_idx"
                )
            n_gpu = len(gpu_idx)
        replica = request.get("replica")
        replica = 1 if replica is None else replica
        if not isinstance(replica, int) or isinstance(replica, bool) or replica < 1:
            raise InvalidRequestError(f"replica must be an integer >= 1, not {replica!r}", param="replica")
        return cls(
            n_gpu=n_gpu,
            gpu_idx=gpu_idx,
            worker_ip=request.get("worker_ip") or None,
            worker_address=request.get("worker_address") or None,
            replica=replica,
            allow_shared_gpu=bool(request.get("allow_shared_gpu", False)),
            memory_bytes=memory_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_gpu": self.n_gpu, "gpu_idx": self.gpu_idx, "worker_ip": self.worker_ip,
            "worker_address": self.worker_address, "replica": self.replica,
            "allow_shared_gpu": self.allow_shared_gpu, "memory_bytes": self.memory_bytes,
        }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _matching(workers: dict[str, WorkerView], req: PlacementRequest) -> dict[str, WorkerView]:
    """The workers the request may use (pinning by address or host)."""
    out = {a: w for a, w in workers.items() if w.running}
    if req.worker_address:
        if req.worker_address not in workers:
            known = ", ".join(sorted(workers)) or "none"
            raise InvalidRequestError(
                f"No worker has address {req.worker_address!r} (workers: {known})", param="worker_address"
            )
        out = {a: w for a, w in out.items() if a == req.worker_address}
    if req.worker_ip:
        out = {a: w for a, w in out.items() if w.host == req.worker_ip or a == req.worker_ip}
        if not out:
            hosts = ", ".join(sorted({w.host for w in workers.values()})) or "none"
            raise InvalidRequestError(
                f"No worker runs on {req.worker_ip!r} (worker hosts: {hosts})", param="worker_ip"
            )
    return out


def place_replicas(
    workers: dict[str, WorkerView],
    bookings: dict[str, dict[int, str]],
    replicas_per_worker: dict[str, int],
    req: PlacementRequest,
    *,
    count: int | None = None,
    same_model_on: dict[str, int] | None = None,
    excluded: dict[str, str] | None = None,
) -> list[Placement]:
    """Places ``count`` (default ``req.replica``) replicas, or raises with every worker's reason.

    ``bookings`` maps worker -> {GPU index: holder}; ``replicas_per_worker``
    counts replicas of any model (to balance); ``same_model_on`` counts this
    model's replicas already running (so new ones spread to other workers
    first); ``excluded`` names workers that cannot run the engine, with why.
    """
    count = req.replica if count is None else count
    candidates = _matching(workers, req)
    excluded = dict(excluded or {})
    for addr in list(candidates):
        if addr in excluded:
            del candidates[addr]
    if not candidates:
        why = "; ".join(f"{a}: {r}" for a, r in sorted(excluded.items()))
        raise InsufficientResourcesError(
            "No worker can take this model" + (f" ({why})" if why else " (the cluster has no running workers)")
        )
    taken = {a: dict(bookings.get(a, {})) for a in candidates}
    load = {a: replicas_per_worker.get(a, 0) for a in candidates}
    mine = {a: (same_model_on or {}).get(a, 0) for a in candidates}

    want_gpus = req.n_gpu
    if want_gpus is None:  # auto: one GPU if any candidate has one free
        any_free = any(len(_free(w, taken[a], False)) > 0 for a, w in candidates.items())
        want_gpus = 1 if any_free else 0

    placements: list[Placement] = []
    for _ in range(count):
        reasons: dict[str, str] = {}
        options: list[tuple[tuple[int, int, int, str], Placement]] = []
        for addr, w in candidates.items():
            pick, reason = _fit(w, taken[addr], want_gpus, req)
            if pick is None:
                reasons[addr] = reason
                continue
            score = (mine[addr], load[addr], -len(_free(w, taken[addr], False)), addr)
            options.append((score, Placement(addr, pick)))
        if not options:
            why = "; ".join(f"{a}: {r}" for a, r in sorted({**reasons, **excluded}.items()))
            done = f" ({len(placements)} of {count} replicas placed)" if placements else ""
            raise InsufficientResourcesError(f"Cannot place the model{done}: {why}")
        _, chosen = min(options, key=lambda o: o[0])
        placements.append(chosen)
        for i in chosen.gpu_idx:
            taken[chosen.address][i] = "(this launch)"
        load[chosen.address] += 1
        mine[chosen.address] += 1
    return placements


def _free(w: WorkerView, taken: dict[int, str], shared: bool) -> list[int]:
    return [i for i in range(w.gpus) if shared or i not in taken]


def _fit(w: WorkerView, taken: dict[int, str], n_gpu: int, req: PlacementRequest) -> tuple[list[int] | None, str]:
    """The GPU indices this worker would give, or None and why not."""
    if req.gpu_idx is not None:
        missing = [i for i in req.gpu_idx if i >= w.gpus]
        if missing:
            return None, f"has {w.gpus} GPU(s), no index {missing}"
        busy = {i: taken[i] for i in req.gpu_idx if i in taken}
        if busy and not req.allow_shared_gpu:
            held = ", ".join(f"GPU {i} by {h}" for i, h in sorted(busy.items()))
            return None, f"{held} (pass allow_shared_gpu=true to share)"
        pick = list(req.gpu_idx)
    elif n_gpu > 0:
        free = _free(w, taken, False)
        if len(free) < n_gpu:
            return None, f"{len(free)} of {w.gpus} GPU(s) free, {n_gpu} needed"
        if w.gpu_free:  # the emptiest GPUs first
            free = sorted(free, key=lambda i: -w.gpu_free.get(i, 0))
        pick = sorted(free[:n_gpu])
    else:
        pick = []
    if req.memory_bytes:
        if pick and w.gpu_free:
            share = req.memory_bytes // len(pick)
            short = [i for i in pick if i in w.gpu_free and w.gpu_free[i] < share]
            if short:
                return None, (f"estimated {_gib(share)} per GPU is above the free memory of GPU {short} "
                              f"({', '.join(_gib(w.gpu_free[i]) for i in short)})")
        elif not pick and w.memory_limit:
            free_bytes = max(0, w.memory_limit - w.memory_used)
            if req.memory_bytes > free_bytes:
                return None, (f"estimated memory {_gib(req.memory_bytes)} is above its free memory "
                              f"{_gib(free_bytes)} (limit {_gib(w.memory_limit)})")
    return pick, ""
