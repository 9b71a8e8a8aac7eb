"""Prometheus ``/metrics``: the collector on its own, then a real server after real requests.

The light tests build the collector over fakes of the supervisor; the slow
ones send requests to the session's default model and check that the
counters moved by exactly what was sent (deltas: other tests share the
server), and that ``XDASK_DISABLE_METRICS=1`` turns the page off.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.servers import LocalServer

from xdask_server.metrics import Metrics, endpoint_labels
from xdask_server.stats import HttpStats, RequestStats, Sampler

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a metrics page, keyed by (sample name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- the collector over fakes -----------------------------------------------------


class FakeRouter:
    def __init__(self) -> None:
        self.outstanding = collections.defaultdict(int, {"key-0": 3})


class FakeSupervisor:
    """What the collector reads of a ``Supervisor``."""

    def __init__(self, cluster: dict[str, Any] | Exception) -> None:
        self.router = FakeRouter()
        self.launches = collections.Counter(ok=2, failed=1)
        self._cluster = cluster

    def cached_records(self) -> list[dict[str, Any]]:
        return [{"model_uid": "m", "spec": {"request_limits": 4},
                 "replicas": [{"replica_id": 0, "state": "ready", "actor_key": "key-0"},
                              {"replica_id": 1, "state": "lost", "actor_key": None}]}]

    def knows(self, uid: str) -> bool:
        return uid == "m"

    async def replica_stats(self) -> dict[str, Any]:
        if isinstance(self._cluster, Exception):
            raise self._cluster
        return self._cluster


CLUSTER = {
    "replicas": [
        {"model_uid": "m", "replica_id": 0, "address": "tcp://w:1", "state": "ready",
         "figures": {"in_flight": 20, "queued": 4, "queue_limit": 8, "max_concurrency": 16, "generating": 16,
                     "requests_total": 123}},
        {"model_uid": "m", "replica_id": 1, "address": "tcp://w:2", "state": "ready", "figures": None},
    ],
    "events": {"ready": 2, "lost": 1, "unhealthy": 1},
    "unreachable": {"tcp://w:2": "no answer"},
}


def render(cluster: dict[str, Any] | Exception = CLUSTER) -> Samples:
    clock = iter(x * 0.5 for x in range(100))
    stats = RequestStats(clock=lambda: next(clock), latency_bounds=(0.25, 1.0), ttft_bounds=(0.1, 1.0))
    with stats.track("m", streamed=True) as tracker:  # starts at 0.0
        tracker.message({"text": "a", "usage": None})  # 0.5: first token
        tracker.message({"text": "b", "usage": {"prompt_tokens": 7, "completion_tokens": 5}})  # 1.0: usage
    with pytest.raises(ValueError), stats.track("m", streamed=False):
        raise ValueError("engine failed")
    stats.reject("m", "request_limits")
    http = HttpStats(bounds=(0.25, 1.0))
    http.record("/v1/chat/completions", "m", 200, 0.2)
    http.record("/v1/chat/completions", "", 404, 0.01)
    sampler = Sampler(stats, interval=1.0, history=10)
    text = asyncio.run(Metrics(FakeSupervisor(cluster), stats, http, sampler).render())
    return parse(text.decode())


def test_collector_exports_the_request_statistics() -> None:
    s = render()
    assert value(s, "xdask_http_requests_total", endpoint="/v1/chat/completions", model="m", status="200") == 1
    assert value(s, "xdask_http_requests_total", endpoint="/v1/chat/completions", model="", status="404") == 1
    assert value(s, "xdask_http_request_duration_seconds_bucket", endpoint="/v1/chat/completions", le="0.25") == 2
    assert value(s, "xdask_requests_total", model="m", outcome="ok") == 1
    assert value(s, "xdask_requests_total", model="m", outcome="error") == 1
    assert value(s, "xdask_requests_rejected_total", model="m", reason="request_limits") == 1
    assert value(s, "xdask_generated_tokens_total", model="m") == 5
    assert value(s, "xdask_prompt_tokens_total", model="m") == 7
    # latencies 1.0 (streamed) and 0.5 (the failed one): both <= 1.0, none <= 0.25
    assert value(s, "xdask_request_latency_seconds_bucket", model="m", le="0.25") == 0
    assert value(s, "xdask_request_latency_seconds_bucket", model="m", le="1.0") == 2
    assert value(s, "xdask_request_latency_seconds_count", model="m") == 2
    assert value(s, "xdask_request_latency_seconds_sum", model="m") == pytest.approx(1.5)
    assert value(s, "xdask_time_to_first_token_seconds_count", model="m") == 1
    assert value(s, "xdask_time_to_first_token_seconds_bucket", model="m", le="1.0") == 1
    assert value(s, "xdask_requests_in_flight", model="m") == 0
    assert ("xdask_tokens_per_second", frozenset({("model", "m")})) in s


def test_collector_exports_models_replicas_and_launches() -> None:
    s = render()
    assert value(s, "xdask_model_request_limit", model="m") == 4
    assert value(s, "xdask_model_replicas", model="m", state="ready") == 1
    assert value(s, "xdask_model_replicas", model="m", state="lost") == 1
    assert value(s, "xdask_replica_outstanding", model="m", replica="0") == 3
    assert value(s, "xdask_launches_total", outcome="ok") == 2
    assert value(s, "xdask_launches_total", outcome="failed") == 1
    one = {"model": "m", "replica": "0", "worker": "tcp://w:1"}
    assert value(s, "xdask_replica_in_flight", **one) == 20
    assert value(s, "xdask_replica_queue_depth", **one) == 4
    assert value(s, "xdask_replica_queue_limit", **one) == 8
    assert value(s, "xdask_replica_slots", **one) == 16
    assert value(s, "xdask_replica_generating", **one) == 16
    assert value(s, "xdask_replica_requests_total", **one) == 123
    assert value(s, "xdask_replica_up", **one) == 1
    assert value(s, "xdask_replica_up", model="m", replica="1", worker="tcp://w:2") == 0
    assert value(s, "xdask_replica_events_total", event="unhealthy") == 1
    assert value(s, "xdask_scheduler_up") == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in s)


def test_collector_without_the_scheduler() -> None:
    s = render(OSError("scheduler gone"))
    assert value(s, "xdask_scheduler_up") == 0
    assert value(s, "xdask_requests_total", model="m", outcome="ok") == 1  # the server's own figures remain
    assert not any(name == "xdask_replica_in_flight" for name, _ in s)


def test_endpoint_labels_are_route_patterns() -> None:
    class A: ...

    class B: ...

    labels = endpoint_labels([(r"/v1/models/([^/]+)", A), (r"/v1/images/(?:edits|variations)", B),
                              (r"/v1/other", A)])
    assert labels == {A: "/v1/models/{id}", B: "/v1/images/{edits|variations}"}


# -- a real server ---------------------------------------------------------------------

pytest_slow = pytest.mark.slow


def scrape(http: httpx.Client) -> Samples:
    resp = http.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


@pytest_slow
def test_counters_match_what_was_sent(http: httpx.Client, default_model: str) -> None:
    before = scrape(http)
    chat = {"model": default_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    completion_tokens = 0
    for _ in range(3):
        resp = http.post("/v1/chat/completions", json=chat)
        assert resp.status_code == 200
        completion_tokens += resp.json()["usage"]["completion_tokens"]
    for _ in range(2):
        with http.stream("POST", "/v1/completions", json={"model": default_model, "prompt": "Once", "max_tokens": 4,
                                                          "stream": True,
                                                          "stream_options": {"include_usage": True}}) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line.startswith("data: {")]
        import json

        usage = json.loads(lines[-1][len("data: "):])["usage"]
        completion_tokens += usage["completion_tokens"]
    assert http.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}).status_code == 404
    assert http.post("/v1/chat/completions", json={**chat, "max_tokens": -1}).status_code == 400
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat_route, completion_route = "/v1/chat/completions", "/v1/completions"
    assert delta("xdask_http_requests_total", endpoint=chat_route, model=default_model, status="200") == 3
    assert delta("xdask_http_requests_total", endpoint=completion_route, model=default_model, status="200") == 2
    # An unknown model is never a label value: hostile names cannot grow the table.
    assert delta("xdask_http_requests_total", endpoint=chat_route, model="", status="404") == 1
    assert not any(dict(labels).get("model") == "no-such-model" for _, labels in after)
    # A body that does not validate names no model either.
    assert delta("xdask_http_requests_total", endpoint=chat_route, model="", status="400") == 1
    assert delta("xdask_requests_total", model=default_model, outcome="ok") == 5
    assert delta("xdask_requests_total", model=default_model, outcome="error") == 0
    assert delta("xdask_generated_tokens_total", model=default_model) == completion_tokens
    assert delta("xdask_time_to_first_token_seconds_count", model=default_model) == 2
    assert delta("xdask_request_latency_seconds_count", model=default_model) == 5
    assert delta("xdask_http_request_duration_seconds_count", endpoint=chat_route) == 5
    # Scraped after the requests ended: nothing in flight, on the server or on the replica.
    assert value(after, "xdask_requests_in_flight", model=default_model) == 0
    replica = {"model": default_model, "replica": "0"}
    workers = [dict(labels)["worker"] for name, labels in after
               if name == "xdask_replica_up" and {("model", default_model), ("replica", "0")} <= labels]
    assert len(workers) == 1
    assert value(after, "xdask_replica_up", **replica, worker=workers[0]) == 1
    assert value(after, "xdask_replica_in_flight", **replica, worker=workers[0]) == 0
    assert value(after, "xdask_replica_slots", **replica, worker=workers[0]) >= 1
    assert delta("xdask_replica_requests_total", **replica, worker=workers[0]) == 5
    assert value(after, "xdask_replica_events_total", event="ready") >= 1
    assert value(after, "xdask_launches_total", outcome="ok") >= 1
    assert value(after, "xdask_scheduler_up") == 1


@pytest.fixture(scope="module")
def no_metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    home: Path = tmp_path_factory.mktemp("xdask-no-metrics")
    srv = LocalServer(home, extra_env={"XDASK_DISABLE_METRICS": "1"})
    yield srv
    srv.stop()


@pytest_slow
def test_disabled_metrics_answer_404(no_metrics_server: LocalServer) -> None:
    resp = httpx.get(f"{no_metrics_server.endpoint}/metrics", timeout=30)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "metrics_disabled"
    assert httpx.get(f"{no_metrics_server.endpoint}/healthz", timeout=30).status_code == 200
