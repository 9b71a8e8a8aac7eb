"""Preload for a cluster-mode scheduler: xdask's log and the model registry.

``dask scheduler --preload xdask.cluster.scheduler_preload`` logs to
``XDASK_HOME/logs/scheduler_<ms>/xdask.log`` and installs the
:class:`~xdask.cluster.registry_plugin.ModelRegistry` before the scheduler
accepts connections. Why preload it when ``xdask-server`` registers the same
plugin on connect: the registry's log lines (launches, lost workers) then land
in the scheduler's own xdask log from the first second, and the registry is in
place even before any server has come up. The plugin is idempotent, so the
server's registration afterwards keeps this instance and its state.

A plain ``dask scheduler`` works too: the server registers the plugin then.

Examples
--------
.. code-block:: bash

    dask scheduler --preload xdask.cluster.scheduler_preload
"""

from __future__ import annotations

import logging
from typing import Any

from xdask.cluster.registry_plugin import ModelRegistry
from xdask.logs import setup_logging

logger = logging.getLogger(__name__)


def dask_setup(scheduler: Any) -> None:
    """Called by Dask when the scheduler starts, before its plugins start.

    ``add_plugin`` (not ``register_scheduler_plugin``): the scheduler calls
    ``start`` on every plugin right after the preloads run, so the registry's
    handlers are installed exactly once.
    """
    path = setup_logging("scheduler")
    scheduler.add_plugin(ModelRegistry(), idempotent=True)
    logger.info("xdask registry on scheduler %s; log %s", scheduler.address, path)
