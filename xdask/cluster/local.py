"""The embedded cluster of ``xdask-local``: a Dask ``LocalCluster``.

Worker processes (not threads), so a model's engine threads and memory live
apart from the server; each worker advertises ``GPU=<count>`` when GPUs exist
so that placement can book them.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import dask.config
from distributed import LocalCluster

from xdask import config

logger = logging.getLogger(__name__)


def detect_gpu_count() -> int:
    """NVIDIA GPUs visible here, via ``nvidia-smi`` (0 without it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


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
        asynchronous=True,
    )
    logger.info("Local cluster %s with %d GPU(s) per worker", cluster.scheduler_address, n_gpu)
    return cluster
