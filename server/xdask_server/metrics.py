"""Prometheus ``GET /metrics``: the server's request statistics and the cluster's replicas, read at scrape time.

Why a custom collector instead of ``Counter``/``Histogram`` objects updated
per request: the request path already keeps every figure in
``RequestStats``/``HttpStats`` (plain integer and float updates, no locks,
DESIGN.md's near-zero overhead), and updating prometheus-client metric objects
per token would add a lock and a label lookup for every message. The
collector turns those figures into metric families when Prometheus asks,
so there is one bookkeeping and the cost lands on the scrape.

What is exported (label ``model`` is a model uid, ``replica`` a replica id):

=============================================  =========  ================================================
``xdask_http_requests_total``                  counter    every HTTP answer by ``endpoint`` (route
                                                          pattern), ``model`` (empty unless running) and
                                                          ``status`` (499: the client hung up)
``xdask_http_request_duration_seconds``        histogram  by ``endpoint``
``xdask_requests_total``                       counter    model requests by ``outcome``: ok, error, cancelled
``xdask_requests_rejected_total``              counter    refused before they ran, by ``reason``:
                                                          request_limits, replica_queue (both 429)
``xdask_request_latency_seconds``              histogram  model requests, start to last token
``xdask_time_to_first_token_seconds``          histogram  streamed model requests
``xdask_generated_tokens_total``               counter    completion tokens
``xdask_prompt_tokens_total``                  counter    prompt tokens
``xdask_tokens_per_second``                    gauge      over ``xdask.dashboard.summary-window`` seconds
``xdask_requests_in_flight``                   gauge      requests this server is serving, per model
``xdask_model_request_limit``                  gauge      a model's ``request_limits`` (models with one)
``xdask_model_replicas``                       gauge      replicas by ``state``
``xdask_replica_outstanding``                  gauge      this server's requests routed to a replica
``xdask_replica_in_flight``                    gauge      requests on the replica's actor (all servers)
``xdask_replica_queue_depth``                  gauge      of those, waiting for an engine slot
``xdask_replica_queue_limit``                  gauge      the replica's queue bound (bounded ones)
``xdask_replica_slots``                        gauge      the engine's concurrent requests
``xdask_replica_generating``                   gauge      engine jobs still running
``xdask_replica_requests_total``               counter    requests the actor took since it loaded
``xdask_replica_up``                           gauge      1 when the replica's worker answered this scrape
``xdask_replica_events_total``                 counter    registry events by ``event`` (placed, ready,
                                                          relaunched, launch_failed, lost, unhealthy, ...)
``xdask_launches_total``                       counter    model launches through this server by ``outcome``
``process_*``                                  (various)  this server process (prometheus-client's own)
=============================================  =========  ================================================

The per-replica figures come from the workers through the scheduler's
registry (``ModelRegistry.replica_stats``: one message per worker, each
bounded by ``xdask.metrics.worker-timeout``), asked once per scrape; a worker
that does not answer leaves its replicas at ``xdask_replica_up 0``.

Examples
--------
>>> metrics = Metrics(supervisor, stats, http_stats, sampler)          # doctest: +SKIP
>>> text = await metrics.render()                                      # doctest: +SKIP
>>> from prometheus_client.parser import text_string_to_metric_families  # doctest: +SKIP
>>> [f.name for f in text_string_to_metric_families(text.decode())][:2]  # doctest: +SKIP
['xdask_http_requests', 'xdask_http_request_duration_seconds']
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from xdask import config
from xdask.cluster.supervisor import Supervisor
from xdask_server.stats import CANCELLED, ERROR, OK, HttpStats, RequestStats, Sampler

logger = logging.getLogger(__name__)

#: The ``Content-Type`` of the answer (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST


def enabled() -> bool:
    """Whether ``/metrics`` serves (``XDASK_DISABLE_METRICS=1``, i.e. ``xdask.metrics.disable``, turns it off)."""
    return not config.get("metrics.disable")


def _buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs from per-bucket counts (the last one is +Inf)."""
    out, total = [], 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
    return out


class XdaskCollector(Collector):
    """Builds the metric families from the statistics and the last replica figures, at each ``collect``."""

    def __init__(self, supervisor: Supervisor, stats: RequestStats, http: HttpStats, sampler: Sampler | None):
        self.supervisor = supervisor
        self.stats = stats
        self.http = http
        self.sampler = sampler
        #: What ``ModelRegistry.replica_stats`` answered for this scrape (None: the scheduler did not answer).
        self.cluster: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._http()
        yield from self._models()
        yield from self._replicas()

    # -- what the HTTP layer saw ------------------------------------------------

    def _http(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("xdask_http_requests", "HTTP requests answered, by route, model and status",
                                       labels=["endpoint", "model", "status"])
        duration = HistogramMetricFamily("xdask_http_request_duration_seconds",
                                         "Time from the request's arrival to its answer", labels=["endpoint"])
        for endpoint, route in sorted(self.http.routes.items()):
            for (model, status), count in sorted(route.requests.items()):
                requests.add_metric([endpoint, model, str(status)], count)
            duration.add_metric([endpoint], _buckets(self.http.bounds, route.duration_buckets),
                                route.duration_seconds_total)
        yield requests
        yield duration

    # -- per model, at this server ---------------------------------------------

    def _models(self) -> Iterator[Metric]:
        stats = self.stats
        outcome = CounterMetricFamily("xdask_requests", "Model requests that ended, by outcome",
                                      labels=["model", "outcome"])
        rejected = CounterMetricFamily("xdask_requests_rejected", "Model requests refused with 429 before they ran",
                                       labels=["model", "reason"])
        latency = HistogramMetricFamily("xdask_request_latency_seconds",
                                        "Model request latency, start to last message", labels=["model"])
        ttft = HistogramMetricFamily("xdask_time_to_first_token_seconds",
                                     "Time to the first token of streamed requests", labels=["model"])
        tokens = CounterMetricFamily("xdask_generated_tokens", "Completion tokens generated", labels=["model"])
        prompt = CounterMetricFamily("xdask_prompt_tokens", "Prompt tokens read", labels=["model"])
        rate = GaugeMetricFamily("xdask_tokens_per_second", "Completion tokens per second over the summary window",
                                 labels=["model"])
        in_flight = GaugeMetricFamily("xdask_requests_in_flight", "Requests this server is serving now",
                                      labels=["model"])
        for uid, m in sorted(stats.models.items()):
            ok = m.requests_total - m.errors_total - m.cancelled_total
            for name, value in ((OK, ok), (ERROR, m.errors_total), (CANCELLED, m.cancelled_total)):
                outcome.add_metric([uid, name], value)
            for reason, count in sorted(m.rejected.items()):
                rejected.add_metric([uid, reason], count)
            latency.add_metric([uid], _buckets(stats.latency_bounds, m.latency_buckets), m.latency_seconds_total)
            ttft.add_metric([uid], _buckets(stats.ttft_bounds, m.ttft_buckets), m.ttft_seconds_total)
            tokens.add_metric([uid], m.tokens_total)
            prompt.add_metric([uid], m.prompt_tokens_total)
            recent = self.sampler.recent(uid) if self.sampler is not None else {}
            rate.add_metric([uid], float(recent.get("tokens_rate") or 0.0))
            in_flight.add_metric([uid], m.in_flight)
        yield from (outcome, rejected, latency, ttft, tokens, prompt, rate, in_flight)

        limit = GaugeMetricFamily("xdask_model_request_limit", "Concurrent requests a model admits per server "
                                  "(request_limits)", labels=["model"])
        replicas = GaugeMetricFamily("xdask_model_replicas", "Replicas of each model by state",
                                     labels=["model", "state"])
        outstanding = GaugeMetricFamily("xdask_replica_outstanding", "This server's requests routed to a replica",
                                        labels=["model", "replica"])
        router = self.supervisor.router.outstanding
        for record in sorted(self.supervisor.cached_records(), key=lambda r: r["model_uid"]):
            uid = record["model_uid"]
            if record["spec"].get("request_limits"):
                limit.add_metric([uid], record["spec"]["request_limits"])
            states: dict[str, int] = {}
            for rep in record["replicas"]:
                states[rep["state"]] = states.get(rep["state"], 0) + 1
                key = rep.get("actor_key")
                outstanding.add_metric([uid, str(rep["replica_id"])], router.get(key, 0) if key else 0)
            for state, count in sorted(states.items()):
                replicas.add_metric([uid, state], count)
        launches = CounterMetricFamily("xdask_launches", "Model launches through this server by outcome",
                                       labels=["outcome"])
        for name in ("ok", "failed"):
            launches.add_metric([name], self.supervisor.launches.get(name, 0))
        yield from (limit, replicas, outstanding, launches)

    # -- per replica, from the workers ------------------------------------------

    def _replicas(self) -> Iterator[Metric]:
        labels = ["model", "replica", "worker"]
        gauges = {
            "in_flight": GaugeMetricFamily("xdask_replica_in_flight", "Requests on the replica (every server's)",
                                           labels=labels),
            "queued": GaugeMetricFamily("xdask_replica_queue_depth", "Requests waiting for an engine slot",
                                        labels=labels),
            "queue_limit": GaugeMetricFamily("xdask_replica_queue_limit", "Requests the replica may hold beyond "
                                             "its slots (xdask.limits.replica-queue)", labels=labels),
            "max_concurrency": GaugeMetricFamily("xdask_replica_slots", "Requests the engine runs at once",
                                                 labels=labels),
            "generating": GaugeMetricFamily("xdask_replica_generating", "Engine jobs still running",
                                            labels=labels),
        }
        served = CounterMetricFamily("xdask_replica_requests", "Requests the replica's actor took since it loaded",
                                     labels=labels)
        up = GaugeMetricFamily("xdask_replica_up", "1 when a ready replica's worker answered this scrape",
                               labels=labels)
        events = CounterMetricFamily("xdask_replica_events", "Registry events since the scheduler started",
                                     labels=["event"])
        cluster = self.cluster or {}
        for rep in cluster.get("replicas", ()):
            names = [rep["model_uid"], str(rep["replica_id"]), rep.get("address") or ""]
            figures = rep.get("figures")
            if rep["state"] == "ready":
                up.add_metric(names, 1 if figures else 0)
            if not figures:
                continue
            for key, family in gauges.items():
                if figures.get(key) is not None:
                    family.add_metric(names, figures[key])
            served.add_metric(names, figures.get("requests_total", 0))
        for event, count in sorted((cluster.get("events") or {}).items()):
            events.add_metric([event], count)
        scheduler_up = GaugeMetricFamily("xdask_scheduler_up", "1 when the scheduler answered this scrape")
        scheduler_up.add_metric([], 0 if self.cluster is None else 1)
        yield from gauges.values()
        yield from (served, up, events, scheduler_up)


class Metrics:
    """The ``/metrics`` page of one server: a registry with xdask's collector and the process collector."""

    def __init__(self, supervisor: Supervisor, stats: RequestStats, http: HttpStats, sampler: Sampler | None = None):
        self.collector = XdaskCollector(supervisor, stats, http, sampler)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)

    async def render(self) -> bytes:
        """Fresh replica figures (bounded wait), then the whole page in Prometheus' text format."""
        try:
            self.collector.cluster = await self.collector.supervisor.replica_stats()
        except Exception as exc:  # noqa: BLE001  (a scheduler that is gone, slow or older: the page still serves)
            logger.debug("No replica figures for this scrape: %s", exc)
            self.collector.cluster = None
        return generate_latest(self.registry)


def _route_label(pattern: str) -> str:
    """A route pattern as a metric label: ``/v1/models/([^/]+)`` -> ``/v1/models/{id}``.

    >>> _route_label(r"/v1/images/(?:edits|variations)")
    '/v1/images/{edits|variations}'
    """
    label = re.sub(r"\(\?:([^()]*)\)", r"{\1}", pattern)
    return re.sub(r"\((?!\?)[^()]*\)", "{id}", label)


def endpoint_labels(routes: Iterable[tuple[Any, ...]]) -> dict[type, str]:
    """Each handler class's ``endpoint`` label: its first route's pattern, made readable.

    A label per class, looked up by the handler's type when it finishes, so
    the request path (unbounded: ids, hostile strings) never becomes a label.
    """
    labels: dict[type, str] = {}
    for pattern, handler, *_ in routes:
        labels.setdefault(handler, _route_label(pattern))
    return labels
