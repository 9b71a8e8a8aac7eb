"""Per-model request statistics of this server process: counters, in-flight gauges and a sampled history.

What it is for: the dashboard's live charts (queue depth, requests/s, tokens/s,
latency per model) and the Prometheus ``/metrics`` page (``xdask_server.metrics``),
which reads the same counters at scrape time (``ModelStats`` totals are
monotonic counters, ``in_flight`` is a gauge, the ``*_buckets`` are histogram
buckets). ``HttpStats`` counts what only the HTTP layer sees: every request
by route, model and status, 4xx included.

Why it looks like this: it sits on the hot path of every generation request,
and DESIGN.md asks for near-zero server overhead. The server is one asyncio
thread, so a request's bookkeeping is a few integer and float updates with no
lock and no await: ``RequestStats.track`` at the start, ``Tracker.message`` per
message from the engine (a ``perf_counter`` call and two additions), and
``Tracker.finish`` once. Everything else (rates, percentiles) is computed by
``Sampler`` once per sample interval, off the request path.

A request is counted under its model once it ends, whatever the end: ``ok``,
``error`` (the engine or routing failed, or the request was invalid for that
model) or ``cancelled`` (the client hung up: the handler cancels the task or
closes the stream's async generator). A request for a model this server does
not know leaves no trace, so a client cannot grow the table with made-up uids.

Examples
--------
>>> stats = RequestStats()
>>> with stats.track("gemma", streamed=True) as tracker:
...     tracker.message({"text": "Hel", "usage": None})
...     tracker.message({"text": "lo", "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
>>> stats.models["gemma"].requests_total, stats.models["gemma"].tokens_total, stats.models["gemma"].in_flight
(1, 2, 0)
>>> sampler = Sampler(stats, interval=1.0, history=600)
>>> sampler.sample()["gemma"]["requests"]
1
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import math
import time
import types
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Self

from xdask import config
from xdask.api.wire import Chunk
from xdask.errors import NotFoundError, RateLimitError

logger = logging.getLogger(__name__)

#: How a request ended.
OK, ERROR, CANCELLED = "ok", "error", "cancelled"
#: ``ModelStats.rejected`` reason of a request every replica refused (their queues were full).
REPLICA_QUEUE = "replica_queue"
#: ``ModelStats.rejected`` reason of a request refused by its model's ``request_limits``.
REQUEST_LIMITS = "request_limits"


def retry_after() -> float:
    """Seconds a 429 asks the client to wait (``xdask.limits.retry-after``)."""
    return float(config.get("limits.retry-after"))


def _bounds(key: str) -> tuple[float, ...]:
    """Histogram bucket bounds from ``xdask.metrics.<key>``, sorted."""
    return tuple(sorted(float(b) for b in config.get(f"metrics.{key}")))


def _observe(buckets: list[int], bounds: tuple[float, ...], value: float) -> None:
    """Count ``value`` in its bucket (``le`` semantics; the last bucket is +Inf)."""
    buckets[bisect.bisect_left(bounds, value)] += 1


@dataclass
class ModelStats:
    """Counters and gauges of one model at this server.

    ``*_total`` only grow (Prometheus counters); ``in_flight`` is a gauge;
    ``latency_buckets``/``ttft_buckets`` count requests per histogram bucket
    of ``RequestStats.latency_bounds``/``ttft_bounds`` (one more for +Inf, not
    cumulative). ``rejected`` counts requests refused before they started,
    by reason. The ``_interval_*`` fields collect what happened since the last
    sample and are reset by ``Sampler`` (never read them elsewhere).
    """

    uid: str
    in_flight: int = 0
    requests_total: int = 0
    errors_total: int = 0
    cancelled_total: int = 0
    tokens_total: int = 0
    prompt_tokens_total: int = 0
    latency_seconds_total: float = 0.0
    ttft_seconds_total: float = 0.0
    ttft_count: int = 0
    latency_buckets: list[int] = field(default_factory=list)
    ttft_buckets: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    _interval_requests: int = 0
    _interval_tokens: int = 0
    _interval_peak: int = 0
    _interval_errors: int = 0
    _interval_latencies: list[float] = field(default_factory=list)
    _interval_ttfts: list[float] = field(default_factory=list)

    def idle(self) -> bool:
        """Nothing in flight and nothing new since the last sample."""
        return self.in_flight == 0 and self._interval_requests == 0 and self._interval_tokens == 0

    def totals(self) -> dict[str, Any]:
        """The counters and the gauge, as plain numbers."""
        done = self.requests_total
        return {
            "model": self.uid,
            "in_flight": self.in_flight,
            "requests_total": done,
            "errors_total": self.errors_total,
            "cancelled_total": self.cancelled_total,
            "tokens_total": self.tokens_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "latency_seconds_total": self.latency_seconds_total,
            "latency_mean": self.latency_seconds_total / done if done else 0.0,
            "ttft_seconds_total": self.ttft_seconds_total,
            "ttft_count": self.ttft_count,
            "rejected": dict(self.rejected),
        }


class Tracker:
    """One request's bookkeeping, from ``RequestStats.track`` to ``finish``.

    ``finish`` runs exactly once (later calls do nothing), so the in-flight
    gauge always goes back down, whichever path ends the request. As a
    context manager it finishes with the block's exception: ``GeneratorExit``
    (an async generator closed early) and ``CancelledError`` (a cancelled
    task) count as cancelled.
    """

    __slots__ = ("_counted", "_done", "_stats", "first", "last", "prompt_tokens", "started", "streamed",
                 "tokens", "uid")

    def __init__(self, stats: RequestStats, uid: str, streamed: bool):
        self._stats = stats
        self.uid = uid
        self.streamed = streamed
        self.started = stats.clock()
        self.first: float | None = None  # when the first text arrived
        self.last: float | None = None  # when the last message arrived
        self.tokens = 0  # completion tokens known so far (exact once the engine reports usage)
        self.prompt_tokens = 0
        self._counted = 0  # tokens already added to the model's interval count
        self._done = False
        stats._begin(uid)

    def message(self, msg: Chunk) -> None:
        """An engine message (an ``xdask.api.wire.Chunk``: text, finish reason, usage) arrived.

        Engines report usage only at the end; until then each message with
        text counts as one token so tokens/s moves while a long answer
        streams, and the exact count replaces the estimate at the end.
        """
        now = self._stats.clock()
        self.last = now
        usage = msg.get("usage")
        if usage:
            self.prompt_tokens, self.tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        elif msg.get("text"):
            self.tokens += 1
        if self.first is None and msg.get("text"):
            self.first = now
        if self.tokens != self._counted:
            self._stats._tokens(self.uid, self.tokens - self._counted)
            self._counted = self.tokens

    def __enter__(self) -> Self:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        """The block's exception (or none) decides the outcome; it is never swallowed."""
        self.finish(exc)

    def finish(self, exc: BaseException | None) -> None:
        """The request ended, with ``exc`` (None: it succeeded)."""
        if self._done:
            return
        self._done = True
        if isinstance(exc, NotFoundError) and exc.code == "model_not_found":
            self._stats._forget_unknown(self.uid, self._counted)
            return
        if isinstance(exc, RateLimitError):  # every replica's queue was full: refused, not served
            self._stats._refused(self.uid, self._counted, REPLICA_QUEUE)
            return
        if exc is None:
            outcome = OK
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            outcome = CANCELLED
        else:
            outcome = ERROR
        end = self.last if self.last is not None else self._stats.clock()
        ttft = self.first - self.started if self.streamed and self.first is not None else None
        self._stats._end(self.uid, outcome, end - self.started, ttft, self.prompt_tokens)


class RequestStats:
    """The statistics of every model this server has served, keyed by model uid."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 latency_bounds: tuple[float, ...] | None = None, ttft_bounds: tuple[float, ...] | None = None
                 ) -> None:
        self.models: dict[str, ModelStats] = {}
        self.clock = clock  # seconds, monotonic; tests pass their own
        #: Upper bounds of the latency and time-to-first-token histograms (``xdask.metrics.*-buckets``).
        self.latency_bounds = latency_bounds if latency_bounds is not None else _bounds("latency-buckets")
        self.ttft_bounds = ttft_bounds if ttft_bounds is not None else _bounds("ttft-buckets")

    def track(self, uid: str, streamed: bool) -> Tracker:
        """Start counting one request to model ``uid``; ``with`` it, or call ``finish`` when it ends."""
        return Tracker(self, uid, streamed)

    def admit(self, uid: str, record: dict[str, Any], streamed: bool) -> Tracker:
        """``track`` a request to ``uid``, or 429 when the model already has ``request_limits`` in flight here.

        A model launched with ``request_limits=N`` serves at most N requests
        at once through each server; the N+1st gets 429 ``rate_limit_exceeded``
        with ``Retry-After`` (``xdask.limits.retry-after``) instead of waiting
        in a queue that would only grow under overload. The check and the
        count happen in one step of the event loop (no await between them),
        on the count the statistics already keep, so there is one bookkeeping
        of what is in flight. The second bound, a replica's queue
        (``xdask.limits.replica-queue``), is the actor's: it counts every
        server's requests.
        """
        limit = record["spec"].get("request_limits")
        if limit and self.in_flight(uid) >= limit:
            self.reject(uid, REQUEST_LIMITS)
            raise RateLimitError(f"Model {uid} is serving its limit of {limit} concurrent requests "
                                 "(request_limits); retry shortly", param="model", retry_after=retry_after())
        return Tracker(self, uid, streamed)

    def forget(self, uid: str) -> None:
        """Drop a model's statistics (it was terminated)."""
        self.models.pop(uid, None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every model's counters and in-flight gauge (what ``/metrics`` exports, histograms aside)."""
        return [m.totals() for m in self.models.values()]

    def in_flight(self, uid: str) -> int:
        """Requests to ``uid`` this server is serving now."""
        entry = self.models.get(uid)
        return entry.in_flight if entry is not None else 0

    def reject(self, uid: str, reason: str) -> None:
        """A request to ``uid`` (a model that exists) was refused before it started, e.g. ``request_limits``."""
        rejected = self._entry(uid).rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    # -- called by Tracker (the hot path) --------------------------------

    def _entry(self, uid: str) -> ModelStats:
        entry = self.models.get(uid)
        if entry is None:
            entry = self.models[uid] = ModelStats(uid, latency_buckets=[0] * (len(self.latency_bounds) + 1),
                                                  ttft_buckets=[0] * (len(self.ttft_bounds) + 1))
        return entry

    def _begin(self, uid: str) -> None:
        entry = self._entry(uid)
        entry.in_flight += 1
        entry._interval_peak = max(entry._interval_peak, entry.in_flight)

    def _tokens(self, uid: str, n: int) -> None:
        entry = self._entry(uid)
        entry.tokens_total += n
        entry._interval_tokens += n

    def _end(self, uid: str, outcome: str, latency: float, ttft: float | None, prompt_tokens: int) -> None:
        entry = self._entry(uid)
        entry.in_flight -= 1
        entry.requests_total += 1
        entry.prompt_tokens_total += prompt_tokens
        entry.latency_seconds_total += latency
        _observe(entry.latency_buckets, self.latency_bounds, latency)
        entry._interval_requests += 1
        entry._interval_latencies.append(latency)
        if ttft is not None:
            entry.ttft_seconds_total += ttft
            entry.ttft_count += 1
            _observe(entry.ttft_buckets, self.ttft_bounds, ttft)
            entry._interval_ttfts.append(ttft)
        if outcome == ERROR:
            entry.errors_total += 1
            entry._interval_errors += 1
        elif outcome == CANCELLED:
            entry.cancelled_total += 1

    def _refused(self, uid: str, tokens: int, reason: str) -> None:
        entry = self._entry(uid)
        entry.in_flight -= 1
        entry.tokens_total -= tokens
        entry._interval_tokens -= tokens
        entry.rejected[reason] = entry.rejected.get(reason, 0) + 1

    def _forget_unknown(self, uid: str, tokens: int) -> None:
        entry = self.models.get(uid)
        if entry is None:
            return
        entry.in_flight -= 1
        entry.tokens_total -= tokens
        entry._interval_tokens -= tokens
        if entry.requests_total == 0 and entry.in_flight == 0 and not entry.rejected:
            del self.models[uid]


@dataclass
class RouteStats:
    """One route's HTTP figures: requests by (model, status), and a duration histogram."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    duration_buckets: list[int] = field(default_factory=list)
    duration_seconds_total: float = 0.0
    count: int = 0


class HttpStats:
    """Every HTTP request this server answered, by route pattern, model and status code.

    What only the HTTP layer sees (400s, 404s, 413s, 429s, the management
    API); the per-model serving figures stay in ``RequestStats``. Labels are
    bounded: ``endpoint`` is the route's pattern (``/v1/models/{uid}``), never
    the raw path, and ``model`` is empty unless the caller vouches that the
    uid is a running model, so hostile requests cannot grow the table.
    ``status`` 499 marks a client that hung up before the answer was complete.

    Examples
    --------
    >>> http = HttpStats(bounds=(0.1, 1.0))
    >>> http.record("/v1/chat/completions", "gemma", 200, 0.4)
    >>> http.routes["/v1/chat/completions"].requests, http.routes["/v1/chat/completions"].duration_buckets
    ({('gemma', 200): 1}, [0, 1, 0])
    """

    def __init__(self, bounds: tuple[float, ...] | None = None) -> None:
        self.bounds = bounds if bounds is not None else _bounds("latency-buckets")
        self.routes: dict[str, RouteStats] = {}

    def record(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        """Count one finished request (a few dict and list updates: the hot path)."""
        route = self.routes.get(endpoint)
        if route is None:
            route = self.routes[endpoint] = RouteStats(duration_buckets=[0] * (len(self.bounds) + 1))
        key = (model, status)
        route.requests[key] = route.requests.get(key, 0) + 1
        route.count += 1
        route.duration_seconds_total += seconds
        _observe(route.duration_buckets, self.bounds, seconds)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


#: The fields of one sample, in the order ``Sampler.series`` returns them.
SAMPLE_FIELDS = ("time", "queue", "queue_peak", "requests_rate", "tokens_rate",
                 "latency_mean", "latency_p95", "ttft_mean", "requests", "errors")


class Sampler:
    """Turns ``RequestStats`` into a per-model history, one sample every ``interval`` seconds.

    A sample holds the wall time (ms since the epoch, as Bokeh's datetime axes
    want), the in-flight count now and its peak over the interval, requests/s
    and tokens/s over the interval, the mean and p95 latency and mean time to
    first token of the requests that ended in it (None when none did), and how
    many ended and how many of those failed. ``history`` samples are kept
    per model.

    ``recent`` sums up the last ``window`` samples (for a table).

    ``live`` (optional) returns the uids of the models that still exist: a
    model that is gone and idle is dropped, history and all. Without it,
    statistics are dropped only by ``RequestStats.forget``.

    ``start`` runs the sampling on the running asyncio loop; ``sample`` is the
    step itself (tests call it with their own clock).
    """

    def __init__(self, stats: RequestStats, interval: float, history: int,
                 live: Callable[[], Collection[str]] | None = None, window: int = 60):
        self.stats = stats
        self.interval = float(interval)
        self.history = int(history)
        self.window = max(1, int(window))
        self._live = live
        self.samples: dict[str, collections.deque[tuple[float | None, ...]]] = {}
        # The last `window` intervals of each model: (seconds, requests, tokens, latencies, ttfts).
        self._recent: dict[str, collections.deque[tuple[float, int, int, list[float], list[float]]]] = {}
        self._last: float | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None, wall: float | None = None) -> dict[str, dict[str, Any]]:
        """Take one sample of every model now; returns them by uid.

        ``now`` is a monotonic clock (``time.monotonic``), ``wall`` the epoch
        time the sample is stamped with; both default to the real clocks.
        """
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        elapsed = now - self._last if self._last is not None else self.interval
        elapsed = max(elapsed, 1e-9)
        self._last = now
        self._drop_gone()
        out = {}
        for uid, entry in list(self.stats.models.items()):
            self._recent.setdefault(uid, collections.deque(maxlen=self.window)).append(
                (elapsed, entry._interval_requests, entry._interval_tokens,
                 entry._interval_latencies, entry._interval_ttfts))
            row = self._take(entry, elapsed, wall)
            self.samples.setdefault(uid, collections.deque(maxlen=self.history)).append(
                tuple(row[f] for f in SAMPLE_FIELDS))
            out[uid] = row
        for uid in set(self.samples) - set(self.stats.models):
            del self.samples[uid]
            self._recent.pop(uid, None)
        return out

    def _take(self, entry: ModelStats, elapsed: float, wall: float) -> dict[str, Any]:
        latencies, ttfts = entry._interval_latencies, entry._interval_ttfts
        row = {
            "time": wall * 1000.0,
            "queue": entry.in_flight,
            "queue_peak": max(entry._interval_peak, entry.in_flight),
            "requests_rate": entry._interval_requests / elapsed,
            "tokens_rate": entry._interval_tokens / elapsed,
            # None, not 0, when no request ended: a chart draws a gap instead of a fast request.
            "latency_mean": _mean(latencies) if latencies else None,
            "latency_p95": percentile(latencies, 0.95) if latencies else None,
            "ttft_mean": _mean(ttfts) if ttfts else None,
            "requests": entry._interval_requests,
            "errors": entry._interval_errors,
        }
        entry._interval_requests = entry._interval_tokens = entry._interval_errors = 0
        entry._interval_peak = entry.in_flight
        entry._interval_latencies = []
        entry._interval_ttfts = []
        return row

    def _drop_gone(self) -> None:
        if self._live is None:
            return
        try:
            live = set(self._live())
        except Exception:  # a broken view of the cluster must not stop the sampling
            logger.exception("Cannot list the live models; keeping every model's statistics")
            return
        for uid, entry in list(self.stats.models.items()):
            if uid not in live and entry.idle():
                del self.stats.models[uid]

    def series(self) -> dict[str, dict[str, list[float | None]]]:
        """Each model's history as columns (``SAMPLE_FIELDS``): ``{uid: {field: [values...]}}``."""
        out = {}
        for uid, rows in self.samples.items():
            columns = list(zip(*rows, strict=True)) if rows else [()] * len(SAMPLE_FIELDS)
            out[uid] = {name: list(col) for name, col in zip(SAMPLE_FIELDS, columns, strict=True)}
        return out

    def recent(self, uid: str) -> dict[str, float | None]:
        """Rates and latencies of ``uid`` over the last ``window`` samples (exact, not an average of samples).

        What a table shows: one interval's p95 is often 0 (no request ended
        in it), the window's is the figure a reader wants.
        """
        spans = self._recent.get(uid) or ()
        seconds = sum(s[0] for s in spans)
        latencies = [x for s in spans for x in s[3]]
        ttfts = [x for s in spans for x in s[4]]
        return {
            "requests_rate": sum(s[1] for s in spans) / seconds if seconds else 0.0,
            "tokens_rate": sum(s[2] for s in spans) / seconds if seconds else 0.0,
            # None, not 0, when nothing ended (or nothing streamed): a table shows "-" rather than a fake 0 s.
            "latency_mean": _mean(latencies) if latencies else None,
            "latency_p95": percentile(latencies, 0.95) if latencies else None,
            "ttft_mean": _mean(ttfts) if ttfts else None,
        }

    def latest(self, uid: str) -> dict[str, Any] | None:
        """The last sample of ``uid``, or None before its first."""
        rows = self.samples.get(uid)
        return dict(zip(SAMPLE_FIELDS, rows[-1], strict=True)) if rows else None

    # -- running on the loop --------------------------------------------------

    def start(self) -> None:
        """Sample every ``interval`` seconds on the running asyncio loop (idempotent)."""
        if self._task is None or self._task.done():
            self._last = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xdask-stats-sampler")

    async def stop(self) -> None:
        """Stop sampling."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            # Sleep to fixed deadlines so the samples do not drift with the loop's load.
            deadline = max(deadline + self.interval, loop.time())
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            try:
                self.sample()
            except Exception:
                logger.exception("Sampling the request statistics failed")
