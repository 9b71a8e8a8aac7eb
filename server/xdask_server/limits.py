"""Admission of a request to a model: its ``request_limits`` (concurrent requests at this server).

A model launched with ``request_limits=N`` serves at most N requests at once
through each server; the N+1st gets 429 ``rate_limit_exceeded`` with a
``Retry-After`` header (``xdask.limits.retry-after``) instead of waiting in a
queue that would only grow under overload. The count is the one the request
statistics already keep (``RequestStats.in_flight``), so there is one
bookkeeping of what is in flight, and the check and the counting happen in
the same step of the event loop: ``admit`` returns without awaiting after its
check, and the caller starts ``stats.track`` at once.

The second bound, a replica's queue (``xdask.limits.replica-queue``), is the
actor's (``ModelActor._admit``): it counts every server's requests.

Examples
--------
>>> await admit(supervisor, stats, "gemma")                      # doctest: +SKIP
>>> with stats.track("gemma", streamed=True) as tracker:
...     ...
"""

from __future__ import annotations

from typing import Any

from xdask import config
from xdask.cluster.supervisor import Supervisor
from xdask.errors import RateLimitError
from xdask_server.stats import RequestStats

#: ``RequestStats.reject`` reason of a request refused by its model's ``request_limits``.
REQUEST_LIMITS = "request_limits"


def retry_after() -> float:
    """Seconds a 429 asks the client to wait (``xdask.limits.retry-after``)."""
    return float(config.get("limits.retry-after"))


async def admit(supervisor: Supervisor, stats: RequestStats, uid: str) -> dict[str, Any]:
    """The model's record, or 429 when ``uid`` already has ``request_limits`` requests in flight here.

    404 for an unknown model (nothing is counted then).
    """
    record = await supervisor._record(uid)
    limit = record["spec"].get("request_limits")
    if limit and stats.in_flight(uid) >= limit:
        stats.reject(uid, REQUEST_LIMITS)
        raise RateLimitError(f"Model {uid} is serving its limit of {limit} concurrent requests "
                             "(request_limits); retry shortly", param="model", retry_after=retry_after())
    return record
