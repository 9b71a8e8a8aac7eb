"""Cluster mode on a real multi-GPU host: placement, isolation, replicas, terminate and recovery.

Run on a machine with two or more NVIDIA GPUs (the lent 2xH100 in our case):
``dask scheduler``, one ``xdask-worker`` that detects the GPUs itself, and
``xdask-server``, all separate processes; the transformers engine serves a
random model with a reduced Qwen2 shape (built offline, bf16 on the GPU).
Prints what it checks and the figures (GPU memory per device from
``nvidia-smi``, recovery time) and exits non-zero at the first failed check.
Writes results/check-cluster-gpu.json (the checks and figures so far, also
after a failed check).

    python tests/benchmarks/check_cluster_gpu.py
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import httpx
from support.cluster_procs import ProcCluster, kill_worker
from support.servers import wait_until
from support.tiny_models import build_tiny_qwen2

#: What this run checked and measured; written to the results file however it ends.
REPORT: dict[str, Any] = {"checks": [], "figures": {}}


def gpu_used_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def check(ok: bool, what: str) -> None:
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    REPORT["checks"].append({"ok": ok, "check": what})
    if not ok:
        raise SystemExit(1)


def figure(name: str, value: Any) -> None:
    REPORT["figures"][name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_result_argument(parser, "check-cluster-gpu")
    args = parser.parse_args()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_tiny_qwen2(Path(tmp) / "model", layers=24, hidden=896)
            launch = {"model_name": "qwen2.5-instruct", "model_engine": "transformers", "model_format": "pytorch",
                      "model_size_in_billions": "0_5", "model_path": str(model)}
            procs = ProcCluster(Path(tmp) / "home", n_workers=1, gpus=None)
            try:
                run(procs, launch)
            except BaseException:
                print(procs.logs())
                raise
            finally:
                procs.close()
    finally:
        REPORT["passed"] = bool(REPORT["checks"]) and all(c["ok"] for c in REPORT["checks"])
        harness.write_result(args.result, REPORT, benchmark="check-cluster-gpu", packages=["torch", "transformers"],
                             settings={"model": "random Qwen2 (24 layers x 896), bf16", "workers": 1})


def run(procs: ProcCluster, launch: dict) -> None:
    http = httpx.Client(base_url=procs.endpoint, timeout=600)
    (worker,) = http.get("/v1/cluster/workers").json()["data"]
    gpus = worker["gpus"]["total"]
    print(f"worker {worker['address']} resources {worker['resources']}; nvidia-smi MiB used {gpu_used_mib()}")
    figure("gpus_detected", gpus)
    check(gpus >= 2, f"xdask-worker detected {gpus} GPUs")

    idle = gpu_used_mib()
    t0 = time.monotonic()
    r = http.post("/v1/models", json={**launch, "model_uid": "a", "n_gpu": 1})
    figure("launch_s", time.monotonic() - t0)
    check(r.status_code == 200, f"launch a with n_gpu=1 ({time.monotonic() - t0:.1f} s) {r.text[:200]}")
    r = http.post("/v1/models", json={**launch, "model_uid": "b", "n_gpu": 1})
    check(r.status_code == 200, f"launch b with n_gpu=1 {r.text[:200]}")
    ga = http.get("/v1/models/a").json()["replicas"][0]
    gb = http.get("/v1/models/b").json()["replicas"][0]
    print(f"a on GPU {ga['gpu_idx']} (engine device {ga['engine']['device']}), "
          f"b on GPU {gb['gpu_idx']} (engine device {gb['engine']['device']})")
    check(ga["gpu_idx"] != gb["gpu_idx"], "a and b booked different GPUs")
    check(ga["engine"]["device"] == f"cuda:{ga['gpu_idx'][0]}" and gb["engine"]["device"] == f"cuda:{gb['gpu_idx'][0]}",
          "each engine runs on the device it booked")
    used = gpu_used_mib()
    grew = [u - i for u, i in zip(used, idle, strict=True)]
    print(f"GPU memory grew by {grew} MiB with a and b loaded")
    figure("gpu_mib_per_model", grew)
    check(all(g > 200 for g in grew[:2]), "both GPUs hold a model")
    if gpus == 2:
        t0 = time.monotonic()
        r = http.post("/v1/models", json={**launch, "model_uid": "c", "n_gpu": 1})
        check(r.status_code == 503 and time.monotonic() - t0 < 2, f"a third n_gpu=1 launch is refused at once: "
              f"{r.json()['error']['message'][:160]}")
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "temperature": 0}
    ta = http.post("/v1/chat/completions", json={**body, "model": "a"}).json()["choices"][0]["message"]["content"]
    tb = http.post("/v1/chat/completions", json={**body, "model": "b"}).json()["choices"][0]["message"]["content"]
    check(ta == tb and len(ta) > 0, f"the same weights on two GPUs answer the same: {ta[:40]!r}")

    before = gpu_used_mib()
    http.delete("/v1/models/a").raise_for_status()
    time.sleep(1)
    after = gpu_used_mib()
    freed = before[ga["gpu_idx"][0]] - after[ga["gpu_idx"][0]]
    print(f"terminate a: GPU {ga['gpu_idx'][0]} went from {before[ga['gpu_idx'][0]]} to "
          f"{after[ga['gpu_idx'][0]]} MiB")
    figure("terminate_gpu_mib", {"before": before[ga["gpu_idx"][0]], "after": after[ga["gpu_idx"][0]]})
    check(freed > 0.5 * grew[ga["gpu_idx"][0]], "terminate freed most of a's GPU memory")
    r = http.post("/v1/models", json={**launch, "model_uid": "a2", "n_gpu": 1})
    check(r.status_code == 200 and http.get("/v1/models/a2").json()["replicas"][0]["gpu_idx"] == ga["gpu_idx"],
          "a relaunch after terminate lands on the freed GPU")
    http.delete("/v1/models/a2").raise_for_status()
    http.delete("/v1/models/b").raise_for_status()

    r = http.post("/v1/models", json={**launch, "model_uid": "r", "n_gpu": 1, "replica": 2})
    check(r.status_code == 200, "launch r with 2 replicas")
    reps = http.get("/v1/models/r").json()["replicas"]
    check(sorted(x["gpu_idx"][0] for x in reps) == [0, 1], f"replicas on GPUs {[x['gpu_idx'] for x in reps]}")

    codes: list[int] = []

    def ask(i: int) -> harness.Reply:
        resp = http.post("/v1/chat/completions", json={**body, "model": "r", "max_tokens": 64})
        codes.append(resp.status_code)
        return harness.Reply(resp.json()["usage"]["completion_tokens"] if resp.status_code == 200 else 0)

    served_run = harness.run_threads(ask, 32, 128)
    served = [x["engine"]["requests_total"] for x in http.get("/v1/models/r").json()["replicas"]]
    print(f"128 requests at concurrency 32: statuses {sorted(set(codes))}, per replica {served}, "
          f"{served_run.tok_s:.1f} tok/s")
    figure("requests_per_replica", served)
    figure("two_replicas_c32", served_run.figures())
    check(codes.count(200) == 128 and min(served) > 20, "both replicas served")

    killed = kill_worker(procs.scheduler_address, reps[0]["address"])
    wait_until(lambda: http.get("/v1/models/r").json()["state"] != "ready", 10, 0.02)
    lost = time.monotonic() - killed
    ok = wait_until(lambda: http.get("/v1/models/r").json()["state"] == "ready", 300, 0.1)
    back = time.monotonic() - killed
    reps = http.get("/v1/models/r").json()["replicas"]
    print(f"kill -9 of the worker (both replicas on it): lost after {lost:.2f} s, both relaunched and ready after "
          f"{back:.1f} s on GPUs {[x['gpu_idx'] for x in reps]}")
    figure("recovery", {"marked_lost_s": lost, "ready_s": back})
    if ok:
        ask(0)
    check(ok and codes[-1] == 200, "relaunched after the worker's nanny restarted it, and answers")
    http.delete("/v1/models/r").raise_for_status()


if __name__ == "__main__":
    main()
