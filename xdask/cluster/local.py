"""The embedded cluster of ``xdask-local``: a Dask ``LocalCluster``.

Worker processes (not threads), so a model's engine threads and memory live
apart from the server; each worker advertises ``GPU=<count>`` when GPUs exist
so that placement can book them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import dask.config
from distributed import LocalCluster

from xdask import config

logger = logging.getLogger(__name__)


def detect_gpu_count() -> int:
    """NVIDIA GPUs this process may use: ``nvidia-smi -L``, narrowed by ``CUDA_VISIBLE_DEVICES``.

    Why both: ``nvidia-smi`` lists every GPU of the machine whatever
    ``CUDA_VISIBLE_DEVICES`` says, while CUDA (and so every engine) sees only
    the listed ones; a worker started with ``CUDA_VISIBLE_DEVICES=1`` owns one
    GPU. When the variable is set, the count is its number of entries (indices
    or UUIDs; CUDA stops at the first negative index, so ``-1`` or an empty
    value means none), capped by what ``nvidia-smi`` sees; without
    ``nvidia-smi`` it is 0, since the variable alone does not prove a GPU.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    entries = 0
    for entry in visible.replace(" ", "").split(","):
        if not entry or entry.startswith("-"):
            break
        entries += 1
    return min(entries, found)


async def start_local_cluster(
    n_workers: int | None = None, threads_per_worker: int | None = None, host: str = "127.0.0.1"
) -> LocalCluster:
    """Start the embedded cluster on ``host`` with random ports."""
    # Worker processes inherit this process's dask config through their nanny.
    dask.config.set(dict(config.get("local.dask-config") or {}))
    n_gpu = detect_gpu_count()
    resources = {"GPU": n_gpu} if n_gpu else None
    cluster = await LocalCluster(
        n_workers=n_workers or int(config.get("local.n-workers")),
        threads_per_worker=threads_per_worker or int(config.get("local.threads-per-worker")),
        processes=True,
        host=host,
        scheduler_port=0,
        dashboard_address=None,
        resources=resources,
        preload=["xdask.cluster.worker"],  # worker logs and GPU ledger, as xdask-worker has
        asynchronous=True,
    )
    logger.info("Local cluster %s with %d GPU(s) per worker", cluster.scheduler_address, n_gpu)
    return cluster
