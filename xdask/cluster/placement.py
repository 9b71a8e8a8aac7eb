"""Choosing the worker (and GPU indices) for a new model replica.

Dask resources do not pin actors, so placement reads the workers' declared
``GPU`` resources and the registry's bookings and returns an explicit
address, which the actor is submitted to with ``workers=[addr]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from xdask.errors import InvalidRequestError, ModelNotReadyError


@dataclass(frozen=True)
class Placement:
    """Where one replica goes."""

    address: str
    gpu_idx: list[int]


def _host(address: str) -> str:
    return urlparse(address).hostname or address


def choose_worker(
    workers: dict[str, dict[str, Any]],
    bookings: dict[str, list[int]],
    models_per_worker: dict[str, int],
    *,
    n_gpu: int | str | None = "auto",
    worker_ip: str | None = None,
    gpu_idx: list[int] | None = None,
) -> Placement:
    """Pick a worker: the one named, else the least loaded that has the GPUs.

    ``n_gpu="auto"`` takes one free GPU where a worker has any, else the CPU;
    ``n_gpu=None`` or ``0`` means CPU only.
    """
    candidates = dict(workers)
    if worker_ip:
        candidates = {
            a: w for a, w in workers.items() if a == worker_ip or _host(a) == worker_ip or a.endswith(worker_ip)
        }
        if not candidates:
            raise InvalidRequestError(f"No worker matches worker_ip={worker_ip!r}", param="worker_ip")
    if not candidates:
        raise ModelNotReadyError("The cluster has no workers")

    def free_gpus(addr: str) -> list[int]:
        total = int((candidates[addr].get("resources") or {}).get("GPU", 0))
        taken = set(bookings.get(addr, []))
        return [i for i in range(total) if i not in taken]

    if gpu_idx:
        want = n_gpu if isinstance(n_gpu, int) and n_gpu > 0 else len(gpu_idx)
        if want != len(gpu_idx):
            raise InvalidRequestError("gpu_idx must list n_gpu indices", param="gpu_idx")
        for addr in sorted(candidates, key=lambda a: models_per_worker.get(a, 0)):
            if set(gpu_idx) <= set(free_gpus(addr)):
                return Placement(addr, list(gpu_idx))
        raise ModelNotReadyError(f"GPUs {gpu_idx} are not free on any matching worker")

    if n_gpu in (None, 0, "0", "none", "None"):
        addr = min(candidates, key=lambda a: (models_per_worker.get(a, 0), a))
        return Placement(addr, [])

    if n_gpu == "auto":
        with_gpu = [a for a in candidates if free_gpus(a)]
        if not with_gpu:
            addr = min(candidates, key=lambda a: (models_per_worker.get(a, 0), a))
            return Placement(addr, [])
        addr = max(with_gpu, key=lambda a: (len(free_gpus(a)), -models_per_worker.get(a, 0)))
        return Placement(addr, free_gpus(addr)[:1])

    try:
        count = int(n_gpu)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"n_gpu must be an integer, 'auto' or null, not {n_gpu!r}", param="n_gpu") from exc
    if count < 0:
        raise InvalidRequestError("n_gpu must not be negative", param="n_gpu")
    fitting = [a for a in candidates if len(free_gpus(a)) >= count]
    if not fitting:
        raise ModelNotReadyError(f"No worker has {count} free GPUs")
    addr = min(fitting, key=lambda a: (models_per_worker.get(a, 0), a))
    return Placement(addr, free_gpus(addr)[:count])
