"""The worker side of an xdask cluster: one ``WorkerPlugin`` that installs what a worker serves, and the preload.

``XdaskWorkerPlugin.setup`` (as distributed's shuffle plugin installs its
handlers) gives each worker

* the ``xdask_generate`` comm op (``xdask.cluster.stream``): tokens and op
  results of the model actors on this worker, pushed to the server;
* the ``xdask_replica_stats`` op: each model actor's load figures, for the
  health check and ``/metrics``;
* its GPU ledger (``xdask.cluster.ledger``).

``Supervisor.connect`` registers the plugin, so every worker of the cluster,
present or joining later, has it before a model is placed on it. Use
``dask worker --resources GPU=2 --preload xdask.cluster.worker`` (what
``xdask-worker`` runs) to also get xdask's logs on the worker.

Examples
--------
>>> from distributed import Client                              # doctest: +SKIP
>>> client = Client("tcp://127.0.0.1:8786")
>>> client.register_plugin(XdaskWorkerPlugin())
>>> client.run(lambda dask_worker: STREAM_OP in dask_worker.handlers)
{'tcp://127.0.0.1:40123': True}
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from xdask.cluster.actor import ModelActor
from xdask.cluster.ledger import PLUGIN_NAME, gpu_ledger
from xdask.cluster.stream import OP as STREAM_OP
from xdask.cluster.stream import StreamHandler

logger = logging.getLogger(__name__)

__all__ = ["PLUGIN_NAME", "STATS_OP", "STREAM_OP", "XdaskWorkerPlugin", "dask_setup", "replica_figures"]

#: The worker op that returns the figures of every model actor on the worker, by actor key.
STATS_OP = "xdask_replica_stats"


def replica_figures(worker: Any) -> dict[str, dict[str, Any]]:
    """``ModelActor.figures`` of each model actor of ``worker``, keyed by actor key."""
    return {key: actor.figures() for key, actor in list(worker.state.actors.items())
            if isinstance(actor, ModelActor)}


class XdaskWorkerPlugin(WorkerPlugin):
    """Installs xdask's comm ops and GPU ledger on a worker (idempotent)."""

    name = "xdask-worker"
    idempotent = True

    def setup(self, worker: Any) -> None:
        gpu_ledger(worker)
        if STREAM_OP not in worker.handlers:
            worker.handlers[STREAM_OP] = StreamHandler(worker).handle
        if STATS_OP not in worker.handlers:
            # One small message per worker, answered from its event loop without touching the engines.
            def stats() -> dict[str, dict[str, Any]]:
                return replica_figures(worker)

            worker.handlers[STATS_OP] = stats


async def dask_setup(worker: Any) -> None:
    """Preload hook of ``dask worker --preload xdask.cluster.worker``: logs, the ledger and the comm ops."""
    from xdask.logs import setup_logging

    path = setup_logging("worker", console=False)
    XdaskWorkerPlugin().setup(worker)
    logger.info("xdask worker %s with %d GPU(s); log %s", worker.address, gpu_ledger(worker).total, path)
