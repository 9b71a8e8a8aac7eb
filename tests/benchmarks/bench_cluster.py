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

Writes results/cluster.json (README: Cluster).

    python tests/benchmarks/bench_cluster.py [--seconds 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import httpx
from support.cluster_procs import ProcCluster, kill_worker
from support.servers import DEFAULT_LAUNCH, wait_until

CONCURRENCY = 16
MAX_TOKENS = 32


def _served(http: httpx.Client, uid: str) -> list[int]:
    return [r["engine"]["requests_total"] for r in http.get(f"/v1/models/{uid}").json()["replicas"]]


def _launch(endpoint: str, uid: str, replicas: int, threads: int) -> None:
    harness.launch(endpoint, {**DEFAULT_LAUNCH, "model_uid": uid, "replica": replicas, "n_gpu": 1,
                              "n_threads": threads, "n_parallel": max(4, CONCURRENCY // replicas)})


def _measure(endpoint: str, uids: list[str], seconds: float) -> harness.Run:
    """``CONCURRENCY`` requests in flight for ``seconds`` (after 3 s of warm-up); request i asks uids[i % K]."""
    harness.http_completions(endpoint, uids, harness.STORY_PROMPTS, CONCURRENCY, MAX_TOKENS, seconds=3)
    return harness.http_completions(endpoint, uids, harness.STORY_PROMPTS, CONCURRENCY, MAX_TOKENS, seconds=seconds)


def routing(procs: ProcCluster, http: httpx.Client, seconds: float) -> list[dict[str, Any]]:
    """One row per replica count: routed and split tokens/s, and the requests each replica served."""
    cores = harness.cores()
    rows: list[dict[str, Any]] = []
    print(f"\nRouting: {CONCURRENCY} concurrent completions of {MAX_TOKENS} tokens, {seconds:.0f} s per row, "
          f"{cores} cores shared by the replicas")
    for replicas in (1, 2, 4):
        threads = max(1, cores // replicas)
        _launch(procs.endpoint, "bench", replicas, threads)
        before = _served(http, "bench")
        routed = _measure(procs.endpoint, ["bench"], seconds)
        spread = [b - a for a, b in zip(before, _served(http, "bench"), strict=True)]
        http.delete("/v1/models/bench").raise_for_status()
        split_uids = [f"split-{i}" for i in range(replicas)]
        for uid in split_uids:
            _launch(procs.endpoint, uid, 1, threads)
        split = _measure(procs.endpoint, split_uids, seconds)
        for uid in split_uids:
            http.delete(f"/v1/models/{uid}").raise_for_status()
        base = rows[0]["routed_tok_s"] if rows else routed.tok_s
        rows.append({"replicas": replicas, "threads": threads, "routed_tok_s": routed.tok_s,
                     "vs_one": harness.ratio(routed.tok_s, base), "split_tok_s": split.tok_s,
                     "routed_over_split": harness.ratio(routed.tok_s, split.tok_s), "requests_per_replica": spread,
                     "routed_latency_ms": routed.figures()["latency_ms"]})
    harness.print_table(["replicas", "threads/replica", "routed tok/s", "vs 1", "split tok/s", "vs split",
                         "requests per replica"],
                        [[r["replicas"], r["threads"], r["routed_tok_s"], r["vs_one"], r["split_tok_s"],
                          r["routed_over_split"], str(r["requests_per_replica"])] for r in rows])
    return rows


def recovery(procs: ProcCluster, http: httpx.Client, rounds: int) -> list[dict[str, float]]:
    """Per round: seconds from ``kill -9`` to marked lost, to relaunched and ready, to the first answer."""
    print("\nRecovery: kill -9 the worker of one of two replicas (restart_on_failure on)")
    harness.launch(procs.endpoint, {**DEFAULT_LAUNCH, "model_uid": "ha", "replica": 2, "n_gpu": 1})
    out = []
    for _ in range(rounds):
        victim = http.get("/v1/models/ha").json()["replicas"][0]["address"]
        killed = kill_worker(procs.scheduler_address, victim)

        def states() -> list[str]:
            return [x["state"] for x in http.get("/v1/models/ha", timeout=10).json()["replicas"]]

        wait_until(lambda: "ready" in states() and len(set(states())) > 1, 10, 0.01)
        lost = time.monotonic() - killed
        wait_until(lambda: set(states()) == {"ready"}, 120, 0.02)
        ready = time.monotonic() - killed
        http.post("/v1/completions", json={"model": "ha", "prompt": "Hi", "max_tokens": 1}).raise_for_status()
        out.append({"marked_lost_s": lost, "ready_s": ready, "answers_s": time.monotonic() - killed})
        wait_until(lambda: len(procs.worker_list()) == 4, 30)
    http.delete("/v1/models/ha")
    harness.print_table(["round", "marked lost (s)", "relaunched+ready (s)", "answers (s)"],
                        [[i + 1, r["marked_lost_s"], r["ready_s"], r["answers_s"]] for i, r in enumerate(out)])
    print(f"median time to a relaunched, ready replica: {statistics.median(r['ready_s'] for r in out):.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", choices=["routing", "recovery"], default=None)
    harness.add_result_argument(parser, "cluster")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        procs = ProcCluster(Path(home), n_workers=4, gpus=1)
        try:
            with httpx.Client(base_url=procs.endpoint, timeout=300) as http:
                if args.skip != "routing":
                    figures["routing"] = routing(procs, http, args.seconds)
                if args.skip != "recovery":
                    figures["recovery"] = recovery(procs, http, args.rounds)
        finally:
            procs.close()
    harness.write_result(args.result, figures, benchmark="cluster", packages=["xllamacpp"],
                         settings={"model": "gemma-3-270m ggufv2 Q4_K_M", "workers": 4, "concurrency": CONCURRENCY,
                                   "max_tokens": MAX_TOKENS, "seconds": args.seconds, "rounds": args.rounds})


if __name__ == "__main__":
    main()
