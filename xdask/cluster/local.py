"""The embedded cluster of ``xdask-local``: a Dask ``LocalCluster``.

Worker processes (not threads), so a model's engine threads and memory live
apart from the server; each worker advertises ``GPU=<count>`` when GPUs exist
so that placement can book them.
"""

from __future__ import annotations

import copy
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


def dashboard_address(setting: str | int | None, host: str) -> str | None:
    """Where the embedded scheduler serves Dask's dashboard, from ``xdask.local.dashboard-address``.

    None, ``""`` or ``false`` turns it off. A bare port (``":8787"``,
    ``8787``, ``":0"`` for any free port) listens on ``host``, the address
    xdask-local was asked to listen on: Dask itself would take a bare port to
    mean every interface, and an ``xdask-local`` on 127.0.0.1 should not show
    its cluster to the network.
    """
    if setting is None or setting is False or str(setting).strip().lower() in ("", "none", "false", "off"):
        return None
    text = str(setting).strip()
    if text.isdigit():
        return f"{host}:{text}"
    if text.startswith(":"):
        return f"{host}{text}"
    return text


def split_gpus(n_gpu: int, n_workers: int, visible: str | None = None) -> list[list[str]]:
    """The GPUs each of ``n_workers`` local workers gets, as ``CUDA_VISIBLE_DEVICES`` entries.

    Round robin over this process's visible GPUs (``visible``, default
    ``CUDA_VISIBLE_DEVICES``, else ``0..n_gpu-1``): with one GPU and two
    workers, the second worker gets none rather than a second claim on GPU 0.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [e for e in (visible or "").replace(" ", "").split(",") if e] if visible else []
    ids = entries[:n_gpu] if entries else [str(i) for i in range(n_gpu)]
    return [ids[i::n_workers] for i in range(n_workers)]


async def start_local_cluster(
    n_workers: int | None = None, threads_per_worker: int | None = None, host: str = "127.0.0.1"
) -> LocalCluster:
    """Start the embedded cluster on ``host`` with random ports.

    With GPUs and several workers, each worker process gets its own share of
    them (its ``CUDA_VISIBLE_DEVICES`` and ``GPU`` resource), as dask-cuda does:
    two workers each declaring every GPU would let placement book one physical
    GPU twice.
    """
    # Worker processes inherit this process's dask config through their nanny.
    dask.config.set(dict(config.get("local.dask-config") or {}))
    n_gpu = detect_gpu_count()
    k = n_workers or int(config.get("local.n-workers"))
    split = n_gpu > 0 and k > 1
    dashboard = dashboard_address(config.get("local.dashboard-address"), host)
    cluster = await LocalCluster(
        n_workers=0 if split else k,
        threads_per_worker=threads_per_worker or int(config.get("local.threads-per-worker")),
        processes=True,
        host=host,
        scheduler_port=0,
        dashboard_address=dashboard,
        resources={"GPU": n_gpu} if n_gpu else None,
        preload=["xdask.cluster.worker"],  # worker logs and GPU ledger, as xdask-worker has
        asynchronous=True,
    )
    if split:
        template = next(iter(cluster.new_worker_spec().values()))
        for i, ids in enumerate(split_gpus(n_gpu, k)):
            spec = copy.deepcopy(template)
            options = spec["options"]
            options["env"] = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": ",".join(ids)}
            options["resources"] = {"GPU": len(ids)} if ids else None
            cluster.worker_spec[f"xdask-{i}"] = spec
        await cluster._correct_state()  # start the workers just specified (SpecCluster's own step)
    logger.info("Local cluster %s: %d worker(s), %d GPU(s); Dask dashboard: %s", cluster.scheduler_address, k,
                n_gpu, (dashboard and cluster.dashboard_link) or "not running")
    return cluster
