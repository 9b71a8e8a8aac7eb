"""The embedded cluster of ``xdask-local``: a Dask ``LocalCluster``.

Worker processes (not threads), so a model's engine threads and memory live
apart from the server; each worker advertises ``GPU=<count>`` when GPUs exist
so that placement can book them.
"""

from __future__ import annotations

import copy
import logging
import os

import dask.config
from distributed import LocalCluster

from xdask import config
from xdask.engines.host import CUDA_VISIBLE_DEVICES, detect_gpu_count, visible_devices

logger = logging.getLogger(__name__)


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

    Round robin over the first ``n_gpu`` of this process's visible GPUs
    (``visible``, default ``CUDA_VISIBLE_DEVICES``, read as CUDA reads it),
    or over ``0..n_gpu-1`` when that lists none: ``n_gpu`` comes from
    ``detect_gpu_count``, which has applied the variable already. With one
    GPU and two workers, the second worker gets none rather than a second
    claim on GPU 0.

    Examples
    --------
    >>> split_gpus(3, 2, "4,5,6")
    [['4', '6'], ['5']]
    >>> split_gpus(2, 2, "")
    [['0'], ['1']]
    """
    entries = visible_devices(os.environ.get(CUDA_VISIBLE_DEVICES) if visible is None else visible)
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
            options["env"] = {**(options.get("env") or {}), CUDA_VISIBLE_DEVICES: ",".join(ids)}
            options["resources"] = {"GPU": len(ids)} if ids else None
            cluster.worker_spec[f"xdask-{i}"] = spec
        await cluster._correct_state()  # start the workers just specified (SpecCluster's own step)
    logger.info("Local cluster %s: %d worker(s), %d GPU(s); Dask dashboard: %s", cluster.scheduler_address, k,
                n_gpu, (dashboard and cluster.dashboard_link) or "not running")
    return cluster
