"""Health: the registry's health check (on fakes), /healthz and /readyz, and a hung worker on a real server.

The settings drive it: ``xdask.health-check.interval`` (probe period),
``attempts`` (failed probes in a row before a replica is lost) and ``disable``
(no probes, no relaunches).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer, wait_until

from xdask.cluster.registry_plugin import ModelRegistry

# -- the health check on fakes ------------------------------------------------------


class FakeWorker:
    def __init__(self, behaviour: Any) -> None:
        self.behaviour = behaviour

    async def xdask_replica_stats(self) -> dict[str, Any]:
        if self.behaviour == "hang":
            await asyncio.sleep(10)
        if isinstance(self.behaviour, Exception):
            raise self.behaviour
        return self.behaviour


class FakeScheduler:
    def __init__(self, workers: dict[str, Any]) -> None:
        self.workers = workers
        self.handlers: dict[str, Any] = {}
        self.tasks = {"key-a": object(), "key-b": object()}
        self.released: list[str] = []

    def rpc(self, address: str) -> FakeWorker:
        return FakeWorker(self.workers[address])

    def client_releases_keys(self, keys: list[str], client: str, stimulus_id: str) -> None:
        self.released.extend(keys)


def registry(workers: dict[str, Any]) -> ModelRegistry:
    reg = ModelRegistry()
    reg.scheduler = FakeScheduler(workers)
    long_ago = time.time() - 60
    for uid, address, key in (("a", "tcp://w:1", "key-a"), ("b", "tcp://w:2", "key-b")):
        reg.records[uid] = {
            "model_uid": uid, "state": "ready", "spec": {}, "launch": {}, "placement": {},
            "restart_on_failure": True, "history": [], "created": long_ago, "was_ready": True,
            "replicas": [{"replica_id": 0, "address": address, "gpu_idx": [], "actor_key": key, "state": "ready",
                          "engine": None, "attempts": 1, "since": long_ago, "error": None}],
        }
    return reg


def test_a_replica_that_answers_stays_ready() -> None:
    reg = registry({"tcp://w:1": {"key-a": {"in_flight": 0}}, "tcp://w:2": {"key-b": {"in_flight": 1}}})
    for _ in range(3):
        assert asyncio.run(reg.health_round(timeout=0.2, attempts=2)) == []
    assert all(r["replicas"][0]["state"] == "ready" for r in reg.records.values())


def test_a_hung_worker_is_lost_after_the_attempts() -> None:
    reg = registry({"tcp://w:1": "hang", "tcp://w:2": {"key-b": {"in_flight": 0}}})
    assert asyncio.run(reg.health_round(timeout=0.1, attempts=3)) == []
    rep = reg.records["a"]["replicas"][0]
    assert rep["state"] == "ready" and rep["failed_probes"] == 1
    assert asyncio.run(reg.health_round(timeout=0.1, attempts=3)) == []
    assert asyncio.run(reg.health_round(timeout=0.1, attempts=3)) == [("a", 0)]
    assert rep["state"] == "lost" and rep["actor_key"] is None
    assert "health check failed 3 times" in rep["error"] and "no answer within 0.1 s" in rep["error"]
    assert reg.records["a"]["state"] == "lost"
    assert reg.scheduler.released == ["key-a"]
    assert reg.event_counts["unhealthy"] == 1
    assert reg.records["b"]["replicas"][0]["state"] == "ready"


def test_an_answer_resets_the_count() -> None:
    workers = {"tcp://w:1": OSError("connection refused"), "tcp://w:2": {"key-b": {}}}
    reg = registry(workers)
    asyncio.run(reg.health_round(timeout=0.1, attempts=2))
    assert reg.records["a"]["replicas"][0]["failed_probes"] == 1
    workers["tcp://w:1"] = {"key-a": {}}
    asyncio.run(reg.health_round(timeout=0.1, attempts=2))
    assert "failed_probes" not in reg.records["a"]["replicas"][0]
    workers["tcp://w:1"] = {}  # the worker answers, but the actor is gone from it
    asyncio.run(reg.health_round(timeout=0.1, attempts=2))
    assert asyncio.run(reg.health_round(timeout=0.1, attempts=2)) == [("a", 0)]
    assert "its actor is gone" in reg.records["a"]["replicas"][0]["error"]


def test_replica_stats_reports_figures_and_unreachable_workers() -> None:
    reg = registry({"tcp://w:1": {"key-a": {"in_flight": 2}}, "tcp://w:2": "hang"})
    stats = asyncio.run(reg.replica_stats(timeout=0.1))
    by_uid = {r["model_uid"]: r for r in stats["replicas"]}
    assert by_uid["a"]["figures"] == {"in_flight": 2}
    assert by_uid["b"]["figures"] is None
    assert stats["unreachable"] == {"tcp://w:2": "no answer within 0.1 s"}


# -- probes on the session's server -----------------------------------------------------


@pytest.mark.slow
def test_liveness_and_readiness(http: httpx.Client) -> None:
    live = http.get("/healthz")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and ready.json()["scheduler"] is True
    health = http.get("/v1/cluster/health").json()
    assert health["health_check"] is True


# -- a hung worker on a server of its own -----------------------------------------------------


def _worker_pids(server: LocalServer) -> list[int]:
    """The Dask worker processes of xdask-local's cluster (each worker says its own pid)."""
    from distributed import Client

    with Client(server.scheduler_address, timeout=30) as client:
        pids = list(client.run(os.getpid).values())
    children = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    assert set(pids) <= children, (pids, children)  # never signal a process that is not ours
    return pids


@pytest.fixture(scope="module")
def probed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    home: Path = tmp_path_factory.mktemp("xdask-health")
    srv = LocalServer(home, extra_env={"XDASK_HEALTH_CHECK_INTERVAL": "0.5", "XDASK_HEALTH_CHECK_ATTEMPTS": "2",
                                       "XDASK_HEALTH_CHECK__REQUIRE_MODEL": "true"})
    yield srv
    for child in psutil.Process(srv.proc.pid).children(recursive=True):  # never leave a stopped worker behind
        try:
            child.send_signal(signal.SIGCONT)
        except psutil.Error:
            pass
    srv.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_worker_is_reported_and_its_model_relaunched(probed_server: LocalServer) -> None:
    with httpx.Client(base_url=probed_server.endpoint, timeout=120) as client:
        # require-model: not ready until a model is
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and "no model is ready" in not_ready.json()["reasons"][0]
        assert client.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "probed"}).status_code == 200
        assert client.get("/readyz").status_code == 200
        pids = _worker_pids(probed_server)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGSTOP)
        try:
            def reported() -> bool:
                model = client.get("/v1/models/probed").json()
                return model["replicas"][0]["state"] != "ready" or model["replicas"][0].get("attempts", 1) > 1

            # 2 probes of 0.5 s, each waiting 0.5 s: lost within a few seconds (Dask's TTL is minutes).
            assert wait_until(reported, timeout=30, interval=0.2)
            events = [e["event"] for e in client.get("/v1/models/probed").json()["history"]]
            assert "unhealthy" in events
            metrics = client.get("/metrics").text
            assert 'xdask_replica_events_total{event="unhealthy"} 1.0' in metrics
        finally:
            os.kill(pids[0], signal.SIGCONT)
        # The worker resumes; the registry relaunches the replica (restart_on_failure) and it serves again.
        assert wait_until(lambda: client.get("/v1/models/probed").json()["state"] == "ready", timeout=120,
                          interval=0.5)
        ok = client.post("/v1/completions", json={"model": "probed", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert client.delete("/v1/models/probed").status_code == 200


# -- XDASK_DISABLE_HEALTH_CHECK -------------------------------------------------------------


def test_disabled_health_check_neither_probes_nor_relaunches() -> None:
    import dask.config

    from xdask.cluster.recovery import Recovery

    lost = [{"model_uid": "a", "restart_on_failure": True, "replicas": [{"replica_id": 0, "state": "lost"}]}]

    async def scenario(disable: bool) -> tuple[bool, int]:
        with dask.config.set({"xdask.health-check.disable": disable}):
            reg = ModelRegistry()
            await reg.start(FakeScheduler({}))
            probing = reg._health_task is not None
            await reg.close()
            recovery = Recovery(client=None, on_records=lambda r: None, excluded_for=None, gpu_free=None)
            recovery._relaunch = lambda uid, rid: asyncio.sleep(0)  # type: ignore[method-assign]
            recovery._schedule(lost)
            scheduled = len(recovery._running)
            await asyncio.gather(*recovery._running.values())
            return probing, scheduled

    assert asyncio.run(scenario(disable=False)) == (True, 1)
    assert asyncio.run(scenario(disable=True)) == (False, 0)
