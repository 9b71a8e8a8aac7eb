"""Benchmark: routing over replicas, and recovery from a dead worker, on a cluster of real processes.

Starts ``dask scheduler``, four ``xdask-worker --resources GPU=1`` and
``xdask-server`` (the cluster mode of the README), then:

  * routing: the default model (Gemma 3 270M Q4_K_M, a CPU model) with 1, 2 and 4
    replicas under concurrency 16 (completions, max_tokens 32): tokens/s, the
    ratio against one replica, and how the requests spread over the replicas.
    The replicas share this machine's cores (each gets cores/replicas decode
    threads, at least one), so the ratio against one replica shows the
    hardware, not routing. To isolate routing, each row also runs K separate
    one-replica models with the 16 clients split evenly between them by the
    client (perfect partitioning, no server-side choice, the same processes
    and threads): "vs split" is the routed rate over that.
  * recovery: with two replicas serving, ``kill -9`` the worker process of one;
    the time until the registry marks it lost, and until the relaunched replica
    is ready and answers (the nanny restarts the worker; placement may use it).

    python tests/benchmarks/bench_cluster.py [--seconds 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_procs import ProcCluster, kill_worker
from conftest import DEFAULT_LAUNCH, wait_until

CONCURRENCY = 16
MAX_TOKENS = 32
PROMPTS = [f"Write a short story about a {thing}." for thing in (
    "dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
    "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")]


async def _drive(endpoint: str, uids: list[str], seconds: float) -> tuple[int, int, float]:
    """``CONCURRENCY`` clients (client i asks ``uids[i % len(uids)]``) for ``seconds``.

    Returns (requests, completion tokens, wall seconds).
    """
    done = [0, 0]
    stop_at = time.monotonic() + seconds

    async def client(i: int) -> None:
        uid = uids[i % len(uids)]
        async with httpx.AsyncClient(base_url=endpoint, timeout=120) as http:
            n = i
            while time.monotonic() < stop_at:
                resp = await http.post("/v1/completions", json={
                    "model": uid, "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0})
                resp.raise_for_status()
                done[0] += 1
                done[1] += resp.json()["usage"]["completion_tokens"]
                n += CONCURRENCY

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))
    return done[0], done[1], time.monotonic() - started


def _served(http: httpx.Client, uid: str) -> list[int]:
    return [r["engine"]["requests_total"] for r in http.get(f"/v1/models/{uid}").json()["replicas"]]


def _launch(http: httpx.Client, uid: str, replicas: int, threads: int) -> None:
    http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": uid, "replica": replicas, "n_gpu": 1,
                                  "n_threads": threads, "n_parallel": max(4, CONCURRENCY // replicas)}
              ).raise_for_status()


def _measure(procs: ProcCluster, uids: list[str], seconds: float) -> tuple[int, float]:
    asyncio.run(_drive(procs.endpoint, uids, 3))  # warm-up
    n, tokens, wall = asyncio.run(_drive(procs.endpoint, uids, seconds))
    return n, tokens / wall


def routing(procs: ProcCluster, http: httpx.Client, seconds: float) -> None:
    cores = len(os.sched_getaffinity(0))
    base = None
    print(f"\nRouting: {CONCURRENCY} concurrent completions of {MAX_TOKENS} tokens, {seconds:.0f} s per row, "
          f"{cores} cores shared by the replicas")
    print(f"{'replicas':>8} {'threads/replica':>15} {'routed tok/s':>12} {'vs 1':>6} {'split tok/s':>11} "
          f"{'vs split':>8}  requests per replica")
    for replicas in (1, 2, 4):
        threads = max(1, cores // replicas)
        _launch(http, "bench", replicas, threads)
        before = _served(http, "bench")
        n, routed = _measure(procs, ["bench"], seconds)
        spread = [b - a for a, b in zip(before, _served(http, "bench"), strict=True)]
        http.delete("/v1/models/bench").raise_for_status()
        split_uids = [f"split-{i}" for i in range(replicas)]
        for uid in split_uids:
            _launch(http, uid, 1, threads)
        _, split = _measure(procs, split_uids, seconds)
        for uid in split_uids:
            http.delete(f"/v1/models/{uid}").raise_for_status()
        base = base or routed
        print(f"{replicas:>8} {threads:>15} {routed:>12.1f} {routed / base:>6.2f} {split:>11.1f} "
              f"{routed / split:>8.2f}  {spread}")


def recovery(procs: ProcCluster, http: httpx.Client, rounds: int) -> None:
    print("\nRecovery: kill -9 the worker of one of two replicas (restart_on_failure on)")
    print(f"{'round':>5} {'marked lost (s)':>15} {'relaunched+ready (s)':>20} {'answers (s)':>12}")
    http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "ha", "replica": 2, "n_gpu": 1}).raise_for_status()
    totals = []
    for r in range(rounds):
        reps = http.get("/v1/models/ha").json()["replicas"]
        victim = reps[0]["address"]
        killed = kill_worker(procs.scheduler_address, victim)

        def states() -> list[str]:
            return [x["state"] for x in http.get("/v1/models/ha", timeout=10).json()["replicas"]]

        wait_until(lambda: "ready" in states() and len(set(states())) > 1, 10, 0.01)
        lost = time.monotonic() - killed
        wait_until(lambda: set(states()) == {"ready"}, 120, 0.02)
        ready = time.monotonic() - killed
        resp = http.post("/v1/completions", json={"model": "ha", "prompt": "Hi", "max_tokens": 1})
        resp.raise_for_status()
        answers = time.monotonic() - killed
        totals.append(ready)
        print(f"{r + 1:>5} {lost:>15.2f} {ready:>20.2f} {answers:>12.2f}")
        wait_until(lambda: len(procs.worker_list()) == 4, 30)
    http.delete("/v1/models/ha")
    print(f"median time to a relaunched, ready replica: {sorted(totals)[len(totals) // 2]:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", choices=["routing", "recovery"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        procs = ProcCluster(Path(home), n_workers=4, gpus=1)
        try:
            with httpx.Client(base_url=procs.endpoint, timeout=300) as http:
                if args.skip != "routing":
                    routing(procs, http, args.seconds)
                if args.skip != "recovery":
                    recovery(procs, http, args.rounds)
        finally:
            procs.close()


if __name__ == "__main__":
    main()
