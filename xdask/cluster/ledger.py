"""The worker's own ledger of its GPU indices (a ``WorkerPlugin``).

The scheduler's ``ModelRegistry`` decides which
GPU indices a replica gets; this plugin is the worker's own ledger of them,
so that two actors in one worker process never hold the same index even if
two schedulers' worth of clients race (a second line of defence), and so
that an actor can ask which CUDA devices its labels mean on this machine.

Examples
--------
>>> from distributed import get_worker                          # doctest: +SKIP
>>> ledger = gpu_ledger(get_worker())
>>> ledger.claim("my-model/0", [1])
>>> ledger.snapshot()
{'total': 2, 'taken': {1: ['my-model/0']}}
>>> ledger.release("my-model/0")
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from xdask.errors import ConflictError, InvalidRequestError

logger = logging.getLogger(__name__)

PLUGIN_NAME = "xdask-gpus"


class GPULedger(WorkerPlugin):
    """Which of this worker's GPU indices each model replica holds.

    Indices are labels ``0 .. GPU-1`` of the worker's ``GPU`` resource; on a
    CUDA machine they are the ordinals of the devices the worker sees.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.total = 0
        self.taken: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        self.total = int(worker.state.total_resources.get("GPU", 0))

    def claim(self, holder: str, gpu_idx: list[int], alive: set[str] | None = None, shared: bool = False) -> None:
        """Book ``gpu_idx`` for ``holder`` (an actor's task key); 409 if another holds one.

        ``shared`` (the launch's ``allow_shared_gpu``) lets holders share an
        index. Holders not in ``alive`` (the worker's task keys) are dropped
        first: an actor released without a shutdown must not keep its GPUs.
        """
        with self._lock:
            if alive is not None:
                for holders in self.taken.values():
                    holders.intersection_update(alive | {holder})
            outside = [i for i in gpu_idx if not 0 <= i < self.total]
            if outside:
                raise InvalidRequestError(
                    f"GPU index {outside} does not exist on this worker (it has {self.total} GPU(s))",
                    param="gpu_idx",
                )
            clash = {i: sorted(self.taken[i] - {holder}) for i in gpu_idx if self.taken.get(i, set()) - {holder}}
            if clash and not shared:
                raise ConflictError(f"GPU(s) already held on this worker: {clash}", param="gpu_idx")
            for i in gpu_idx:
                self.taken.setdefault(i, set()).add(holder)

    def release(self, holder: str) -> list[int]:
        """Give back every index ``holder`` held; returns them."""
        with self._lock:
            freed = [i for i, holders in self.taken.items() if holder in holders]
            for i in freed:
                self.taken[i].discard(holder)
            self.taken = {i: h for i, h in self.taken.items() if h}
            return freed

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"total": self.total, "taken": {i: sorted(h) for i, h in self.taken.items() if h}}


def gpu_ledger(worker: Any) -> GPULedger:
    """This worker's ledger, installed on first use (workers started without the preload)."""
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        plugin = GPULedger()
        plugin.setup(worker)
        worker.plugins[PLUGIN_NAME] = plugin
    return plugin
