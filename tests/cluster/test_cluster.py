"""Cluster mode with real processes: ``dask scheduler``, three ``xdask-worker --resources GPU=2``, ``xdask-server``.

GPU indices are labels on this CPU machine, but the scheduler's registry and
each worker's ledger book them exactly as on a GPU cluster, so placement,
replicas, failure recovery and a server restart are exercised for real with
the default GGUF model (which runs on the CPU).
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.cluster_procs import ProcCluster, kill_worker
from support.servers import DEFAULT_LAUNCH, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcCluster]:
    home = tmp_path_factory.mktemp("cluster-home")
    # One decode thread and four slots per model: several models share this machine's two cores.
    env = {"XDASK_LLAMA_CPP_N_THREADS": "1", "XDASK_LLAMA_CPP_N_PARALLEL": "4"}
    procs = ProcCluster(home, n_workers=3, gpus=2, env=env)
    yield procs
    procs.close()


@pytest.fixture(scope="module")
def http(cluster: ProcCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.endpoint, timeout=120) as client:
        yield client


def launch(http: httpx.Client, uid: str, **kw: Any) -> httpx.Response:
    return http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": uid, **kw})


def terminate(http: httpx.Client, *uids: str) -> None:
    for uid in uids:
        http.delete(f"/v1/models/{uid}")


def workers_by_name(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in http.get("/v1/cluster/workers").json()["data"]}


def ask(http: httpx.Client, uid: str, timeout: float = 60) -> httpx.Response:
    return http.post("/v1/completions", json={"model": uid, "prompt": "The capital of France is",
                                              "max_tokens": 8, "temperature": 0}, timeout=timeout)


def test_workers_and_health(http: httpx.Client, cluster: ProcCluster) -> None:
    workers = workers_by_name(http)
    assert sorted(workers) == ["w0", "w1", "w2"]
    for w in workers.values():
        assert w["resources"] == {"GPU": 2} and w["gpus"] == {"total": 2, "used": [], "free": [0, 1]}
        assert w["status"] == "running" and w["memory"]["limit"] > 0 and w["memory"]["used"] > 0
    health = http.get("/v1/cluster/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["workers"] == 3
    out = subprocess.run([sys.executable, "-m", "xdask.cli", "workers", "-e", cluster.endpoint],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(w["address"] in out.stdout.replace("\n", "") or w["name"] in out.stdout for w in workers.values())


def test_pinned_worker_and_gpu_idx(http: httpx.Client) -> None:
    target = workers_by_name(http)["w1"]["address"]
    try:
        resp = launch(http, "pinned", worker_address=target, gpu_idx=[1])
        assert resp.status_code == 200, resp.text
        desc = http.get("/v1/models/pinned").json()
        (rep,) = desc["replicas"]
        assert rep["address"] == target and rep["gpu_idx"] == [1] and rep["state"] == "ready"
        assert rep["engine"]["gpu_idx"] == [1]  # the actor itself was given that index
        assert desc["accelerators"] == ["1"]
        assert workers_by_name(http)["w1"]["gpus"] == {"total": 2, "used": [1], "free": [0]}
        assert ask(http, "pinned").status_code == 200
        # The same index again on the same worker is refused at once, with the holder named.
        started = time.monotonic()
        again = launch(http, "pinned-2", worker_address=target, gpu_idx=[1])
        assert time.monotonic() - started < 2
        assert again.status_code == 503 and "GPU 1 by pinned/0" in again.json()["error"]["message"]
        # worker_ip pins to a host: all three workers share 127.0.0.1 here, so it must just work.
        resp = launch(http, "by-ip", worker_ip="127.0.0.1", n_gpu=0)
        assert resp.status_code == 200, resp.text
        assert http.get("/v1/models/by-ip").json()["replicas"][0]["gpu_idx"] == []
    finally:
        terminate(http, "pinned", "pinned-2", "by-ip")
    assert workers_by_name(http)["w1"]["gpus"]["used"] == []  # terminate gave the index back


def test_replicas_spread_without_double_booking(http: httpx.Client) -> None:
    try:
        resp = launch(http, "spread", replica=3, n_gpu=1)
        assert resp.status_code == 200, resp.text
        reps = http.get("/v1/models/spread").json()["replicas"]
        assert len({r["address"] for r in reps}) == 3  # one per worker
        resp = launch(http, "spread-2", replica=3, n_gpu=1)
        assert resp.status_code == 200, resp.text
        booked = [(w["address"], i) for w in workers_by_name(http).values() for i in w["gpus"]["used"]]
        assert len(booked) == len(set(booked)) == 6
        held = [(r["address"], i) for uid in ("spread", "spread-2")
                for r in http.get(f"/v1/models/{uid}").json()["replicas"] for i in r["engine"]["gpu_idx"]]
        assert sorted(held) == sorted(booked)  # every actor got exactly what the registry booked
        # Every GPU is taken: a GPU launch is refused at once and says why for each worker.
        started = time.monotonic()
        full = launch(http, "no-room", n_gpu=1)
        elapsed = time.monotonic() - started
        err = full.json()["error"]
        assert full.status_code == 503 and err["code"] == "insufficient_resources", full.text
        assert elapsed < 2 and err["message"].count("0 of 2 GPU(s) free") == 3
        assert http.get("/v1/models/no-room").status_code == 404
    finally:
        terminate(http, "spread", "spread-2")


def test_unplaceable_launches_answer_at_once(http: httpx.Client) -> None:
    cases = [
        ({"worker_address": "tcp://10.255.0.1:1234"}, 400, "No worker has address"),
        ({"worker_ip": "10.255.0.1"}, 400, "No worker runs on"),
        ({"n_gpu": 3}, 503, "2 of 2 GPU(s) free, 3 needed"),
        ({"gpu_idx": [7]}, 503, "no index [7]"),
        ({"n_gpu": "lots"}, 400, "n_gpu must be"),
    ]
    for extra, status, words in cases:
        started = time.monotonic()
        resp = launch(http, "nowhere", **extra)
        elapsed = time.monotonic() - started
        assert resp.status_code == status, (extra, resp.text)
        assert words in resp.json()["error"]["message"], (extra, resp.text)
        assert elapsed < 2, (extra, elapsed)


def test_memory_estimate_refuses_a_model_too_big(http: httpx.Client) -> None:
    pytest.importorskip("transformers", reason="the pytorch spec needs the transformers engine on the workers")
    started = time.monotonic()
    resp = launch(http, "huge", model_name="qwen2.5-instruct", model_engine="transformers", model_format="pytorch",
                  model_size_in_billions=7, quantization="none", n_gpu=0)
    assert time.monotonic() - started < 2
    assert resp.status_code == 503, resp.text
    assert "estimated memory" in resp.json()["error"]["message"] and "above its free memory" in resp.text


def test_terminate_frees_memory_and_the_gpu(http: httpx.Client, cluster: ProcCluster) -> None:
    from distributed import Client

    target = workers_by_name(http)["w2"]["address"]

    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    with Client(cluster.scheduler_address, timeout=30) as dc:
        before = dc.run(rss, workers=[target])[target]
        assert launch(http, "mem", worker_address=target, n_gpu=1).status_code == 200
        assert http.get("/v1/models/mem").json()["replicas"][0]["gpu_idx"] == [0]
        assert ask(http, "mem").status_code == 200
        loaded = dc.run(rss, workers=[target])[target]
        terminate(http, "mem")
        after = dc.run(rss, workers=[target])[target]
    assert loaded - before > 100 * 2**20, (before, loaded)  # the model really was in that process
    assert after - before < (loaded - before) / 2, (before, loaded, after)
    assert workers_by_name(http)["w2"]["gpus"]["used"] == []
    try:  # relaunching after terminate lands on the freed index
        assert launch(http, "mem", worker_address=target, n_gpu=1).status_code == 200
        assert http.get("/v1/models/mem").json()["replicas"][0]["gpu_idx"] == [0]
    finally:
        terminate(http, "mem")


class Load:
    """Clients sending short completions in a loop, one of them streaming longer answers.

    Every outcome is recorded with its latency; a stream that ends with an
    in-band error event counts as that error's status (the HTTP status was 200
    before the worker died).
    """

    def __init__(self, endpoint: str, uid: str, clients: int = 3):
        self.endpoint, self.uid = endpoint, uid
        self.results: list[tuple[float, int, float, str]] = []  # (start, status, seconds, text)
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._run, streaming=i == 0) for i in range(clients)]

    def _once(self, client: httpx.Client, streaming: bool) -> tuple[int, str]:
        if not streaming:
            resp = ask(client, self.uid, timeout=10)
            return resp.status_code, resp.text
        body = {"model": self.uid, "prompt": "Once upon a time", "max_tokens": 48, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as resp:
            events = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
        if resp.status_code != 200:
            return resp.status_code, "".join(events)
        if events[-1:] != ["[DONE]"]:
            return -2, f"stream ended without [DONE]: {events[-3:]}"
        errors = [json.loads(e) for e in events[:-1] if '"error"' in e]
        if errors:
            return (503 if errors[0]["error"]["type"] == "service_unavailable" else 500), json.dumps(errors[0])
        return 200, "".join(events)

    def _run(self, streaming: bool) -> None:
        with httpx.Client(base_url=self.endpoint, timeout=10) as client:  # a hang fails at 10 s
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    status, text = self._once(client, streaming)
                except httpx.TimeoutException as exc:
                    status, text = -1, f"timeout: {exc}"
                self.results.append((t0, status, time.monotonic() - t0, text))

    def stop(self) -> None:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()


def _replicas(http: httpx.Client, uid: str) -> list[dict[str, Any]]:
    return http.get(f"/v1/models/{uid}").json()["replicas"]


def test_worker_killed_under_load_recovers(http: httpx.Client, cluster: ProcCluster) -> None:
    """kill -9 the worker of one of two replicas while requests stream in: 200 or 503, never a hang; relaunch."""
    assert launch(http, "ha", replica=2, n_gpu=1).status_code == 200
    victim = _replicas(http, "ha")[0]["address"]
    # A model without restart on the same worker: it must stay lost, and say so.
    assert launch(http, "fragile", worker_address=victim, n_gpu=1, restart_on_failure=False).status_code == 200
    load = Load(cluster.endpoint, "ha")
    # A stream that is mid-answer on the victim when it dies must end with an in-band 503 event.
    midway: dict[str, Any] = {}
    first_text = threading.Event()

    def stream_fragile() -> None:
        body = {"model": "fragile", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True}
        with httpx.Client(base_url=cluster.endpoint, timeout=10) as client, \
                client.stream("POST", "/v1/completions", json=body) as resp:
            events = []
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if '"text": "' in line and '"text": ""' not in line:
                        first_text.set()
            midway.update(status=resp.status_code, events=events, ended=time.monotonic())

    streamer = threading.Thread(target=stream_fragile)
    streamer.start()
    try:
        assert first_text.wait(30)
        time.sleep(1)
        killed = kill_worker(cluster.scheduler_address, victim)
        assert wait_until(lambda: any(r["state"] != "ready" for r in _replicas(http, "ha")), 5, 0.05)
        marked_lost = time.monotonic() - killed
        assert wait_until(lambda: all(r["state"] == "ready" for r in _replicas(http, "ha")), 90, 0.1), \
            cluster.logs()
        recovered = time.monotonic() - killed
        time.sleep(3)  # keep the load on the relaunched replica too
    finally:
        load.stop()
        streamer.join(30)
    assert midway["status"] == 200 and midway["events"][-1] == "[DONE]"
    error = json.loads(midway["events"][-2])["error"]
    assert error["type"] == "service_unavailable" and "worker" in error["message"], error
    assert midway["ended"] - killed < 10
    statuses = [s for _, s, _, _ in load.results]
    print(f"\nreplica marked lost {marked_lost:.2f} s after kill -9; serving again after {recovered:.2f} s; "
          f"requests: {statuses.count(200)} ok, {statuses.count(503)} x 503, {len(statuses)} in all")
    assert statuses.count(200) > 10
    bad = [(s, round(d, 2), t[:200]) for _, s, d, t in load.results if s not in (200, 503)]
    assert not bad, bad  # no hang (-1), no 500
    for _, s, d, text in load.results:
        if s == 503:
            assert d < 10 and "error" in text
    after = [s for t0, s, _, _ in load.results if t0 > killed + recovered]
    assert after and all(s == 200 for s in after)
    reps = _replicas(http, "ha")
    assert all(r["address"] != victim for r in reps)
    desc = http.get("/v1/models/ha").json()
    events = [h["event"] for h in desc["history"]]
    assert "lost" in events and "relaunched" in events
    # Both replicas take requests after recovery (least outstanding spreads them).
    assert all(r["load"]["in_flight"] is not None for r in reps)
    # The model without restart stays lost: 503 for its requests, and health says degraded.
    fragile = http.get("/v1/models/fragile").json()
    assert fragile["state"] == "lost" and fragile["replicas"][0]["state"] == "lost"
    resp = ask(http, "fragile")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_lost"
    health = http.get("/v1/cluster/health")
    assert health.status_code == 503 and any("fragile" in p for p in health.json()["problems"])
    terminate(http, "fragile")
    # The worker came back (its nanny restarted it): it is back with every GPU free and usable.
    assert wait_until(lambda: len(workers_by_name(http)) == 3, 30)
    back = [w for w in workers_by_name(http).values() if w["address"] not in {r["address"] for r in reps}]
    assert back and any(w["gpus"]["used"] == [] for w in back)
    assert http.get("/v1/cluster/health").status_code == 200


def test_server_restart_keeps_models(http: httpx.Client, cluster: ProcCluster) -> None:
    """kill -9 the server and start a new one on the same scheduler: models are listed and answer."""
    if http.get("/v1/models/ha").status_code != 200:
        assert launch(http, "ha", replica=2, n_gpu=1).status_code == 200
    assert cluster.server is not None
    cluster.server.kill()
    cluster.procs.remove(cluster.server)
    cluster.start_server()
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert "ha" in listed and listed["ha"]["state"] == "ready" and listed["ha"]["replica"] == 2
    assert ask(http, "ha").status_code == 200
    terminate(http, "ha")


def test_logs_layout(cluster: ProcCluster) -> None:
    logs = Path(cluster.home) / "logs"
    roles = {p.name.rsplit("_", 1)[0] for p in logs.iterdir() if (p / "xdask.log").exists()}
    assert {"worker", "server"} <= roles, sorted(p.name for p in logs.iterdir())
