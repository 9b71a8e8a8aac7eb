"""Spreading requests over a model's replicas: least outstanding requests first.

Why least-outstanding rather than round robin: requests differ by orders of
magnitude in length, and a replica busy with long answers should get fewer
new ones. The counts are this server's own in-flight requests per replica,
kept in memory (no call on the hot path); with several servers each balances
its own share.

A request whose replica turns out to be gone before it produced anything
(the worker died, the actor was removed) or full (its queue bound,
``xdask.limits.replica-queue``, reached: 429) is retried once per other
ready replica; one that already streamed text ends with the 503, since the
client has seen part of an answer. When every replica was full, the 429
goes to the client.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from xdask.api.wire import Chunk, GenerationRequest, InvokeRequest
from xdask.cluster.stream import open_stream
from xdask.errors import ModelNotReadyError, NotFoundError, RateLimitError, WorkerLostError

logger = logging.getLogger(__name__)


class Router:
    """Chooses a replica per request and streams the request to it; keeps the registry records it routes by.

    ``fetch(uid)`` reads one record from the scheduler's registry (None: no
    such model). Records are trusted for ``ttl`` seconds (the server's watch
    loop also refreshes them all), so a request costs no scheduler call.
    """

    def __init__(self, pool: Any, fetch: Callable[[str], Awaitable[dict[str, Any] | None]], ttl: float = 2.0):
        self._pool = pool  # the Dask client's connection pool (client.rpc)
        self._fetch = fetch
        self._ttl = ttl
        self._records: dict[str, tuple[float, dict[str, Any]]] = {}  # uid -> (when read, record)
        self.outstanding: defaultdict[str, int] = defaultdict(int)  # actor key -> requests in flight here
        self._tie = itertools.count()

    async def record(self, uid: str, fresh: bool = False) -> dict[str, Any]:
        """The registry record of model ``uid`` (cached for ``ttl`` unless ``fresh``); 404 if unknown."""
        hit = self._records.get(uid)
        if not fresh and hit is not None and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        record = await self._fetch(uid)
        if record is None:
            self._records.pop(uid, None)
            raise NotFoundError(f"Model not found in the model list, uid: {uid}", param="model",
                                code="model_not_found")
        self.remember(record)
        return record

    def remember(self, record: dict[str, Any]) -> None:
        """Keep a record just read from the registry."""
        self._records[record["model_uid"]] = (time.monotonic(), record)

    def forget(self, uid: str) -> None:
        """Drop the record of a model that is gone."""
        self._records.pop(uid, None)

    def refresh(self, records: list[dict[str, Any]]) -> None:
        """Replace every record with the registry's whole list (models not in it are gone)."""
        now = time.monotonic()
        self._records = {r["model_uid"]: (now, r) for r in records}

    def records(self) -> dict[str, dict[str, Any]]:
        """The records as last read, by uid (no call)."""
        return {uid: record for uid, (_, record) in self._records.items()}

    def knows(self, uid: str) -> bool:
        """Whether a record of ``uid`` is kept (no call, no copy: every HTTP answer asks)."""
        return uid in self._records

    def uids(self) -> list[str]:
        """The uids of the records kept (no call)."""
        return list(self._records)

    def pick(self, record: dict[str, Any], skip: set[str]) -> dict[str, Any] | None:
        """The ready replica with the fewest outstanding requests (ties rotate)."""
        ready = [r for r in record["replicas"] if r["state"] == "ready" and r.get("actor_key")
                 and r["actor_key"] not in skip]
        if not ready:
            return None
        low = min(self.outstanding[r["actor_key"]] for r in ready)
        best = [r for r in ready if self.outstanding[r["actor_key"]] == low]
        return best[next(self._tie) % len(best)]

    async def stream(self, uid: str, request: GenerationRequest | InvokeRequest,
                     record: dict[str, Any] | None = None) -> AsyncIterator[Chunk]:
        """Route one request and yield the worker's messages.

        ``record``: the model's registry record if the caller has it already
        (it is looked up once per request); it is read again only when its
        replicas turn out to be stale.
        """
        if record is None:
            record = await self.record(uid)
        tried: set[str] = set()
        full: RateLimitError | None = None  # the last replica that refused for a full queue
        while True:
            rep = self.pick(record, tried)
            if rep is None and not tried:
                record = await self.record(uid, fresh=True)  # the cached record may be stale
                rep = self.pick(record, tried)
            if rep is None:
                if full is not None:
                    raise full
                if tried:
                    raise WorkerLostError(f"Model {uid}: its replicas became unreachable; retry shortly",
                                          code="replica_lost")
                state = record["state"]
                raise ModelNotReadyError(f"Model {uid} has no replica serving now (state: {state})",
                                         code=f"model_{state}")
            key = rep["actor_key"]
            self.outstanding[key] += 1
            produced = False
            try:
                async for msg in open_stream(self._pool, rep["address"], key, request):
                    produced = True
                    yield msg
                return
            except RateLimitError as exc:
                if produced or exc.code != "replica_queue_full":
                    raise
                tried.add(key)
                full = exc
            except ModelNotReadyError as exc:
                gone = isinstance(exc, WorkerLostError) or exc.code == "model_gone"
                if produced or not gone:
                    raise
                logger.warning("Replica %s of %s unreachable (%s); trying another", key, uid, exc)
                tried.add(key)
                record = await self.record(uid, fresh=True)
            finally:
                self.outstanding[key] -= 1
                if self.outstanding[key] <= 0:
                    del self.outstanding[key]
