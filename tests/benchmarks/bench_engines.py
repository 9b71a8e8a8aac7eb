"""Benchmark: each Python engine in-process vs. the same engine behind xdask's HTTP API (CPU).

For the tiny random Qwen2 model (the tests' fixture; HF format), completions of
``--new`` tokens, temperature 0, at concurrency 1 and 16: completion tokens/s
of (a) the engine module called directly in-process (``make_engine`` +
``generate`` from threads, exactly what the model actor runs) and (b) the
same engine launched through ``POST /v1/models`` on ``xdask-local`` and driven
over HTTP; ratio b/a. The library-level comparisons (our engine vs plain
``generate``, ``AsyncLLM``, mlx-lm) are in bench_transformers_gpu.py,
bench_vllm.py and bench_mlx.py.

    python tests/benchmarks/bench_engines.py [--engines transformers,vllm,mlx] [--new 64]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_llm import PROMPTS, XdaskLocal, http_throughput
from tiny_models import build_tiny_qwen2

MODULES = {"transformers": "transformers", "vllm": "vllm", "mlx": "mlx_lm"}
KWARGS = {"transformers": {}, "vllm": {"max_model_len": 1024}, "mlx": {}}


def inprocess(engine: str, path: str, concurrency: int, n_requests: int, new: int) -> float:
    from xdask.engines import create_engine
    from xdask.engines.base import SamplingParams
    from xdask.registry import resolve

    eng = create_engine(resolve("qwen2.5-instruct", "pytorch", "0_5", None), engine, path, dict(KWARGS[engine]))
    eng.load()
    try:
        def one(i: int) -> int:
            out = []
            eng.generate(PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=new, temperature=0),
                         lambda d: out.append(d) and False)
            return out[-1].completion_tokens or 0

        one(0)
        counts: list[int] = []
        queue = list(range(n_requests))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop()
                n = one(i)
                with lock:
                    counts.append(n)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)
    finally:
        eng.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(MODULES))
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=4,
                        help="requests per run = rounds x max(concurrency, 4): tiny models finish a short run "
                             "in a fraction of a second, where fixed per-request costs dominate")
    args = parser.parse_args()
    os.environ.setdefault("XDASK_HOME", tempfile.mkdtemp(prefix="xdask-bench-home-"))
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    path = str(build_tiny_qwen2(Path(tempfile.mkdtemp(prefix="tiny-qwen2-"))))
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"tiny Qwen2 (hidden 128, 2 layers), {args.new} new tokens, temperature 0, cpu threads "
          f"{len(os.sched_getaffinity(0))}\n")
    print(f"{'engine':14}{'concurrency':>12}{'a: in-process':>15}{'b: xdask HTTP':>15}{'b/a':>7}")
    srv = XdaskLocal(tempfile.mkdtemp(prefix="xdask-bench-"))
    try:
        for engine in args.engines.split(","):
            if importlib.util.find_spec(MODULES[engine]) is None:
                print(f"{engine:14} not installed, skipped")
                continue
            uid = f"bench-{engine}"
            with httpx.Client(base_url=srv.url, timeout=900) as client:
                client.post("/v1/models", json={"model_name": "qwen2.5-instruct", "model_engine": engine,
                                                "model_format": "pytorch", "model_size_in_billions": "0_5",
                                                "model_path": path, "model_uid": uid, **KWARGS[engine]}).raise_for_status()
            for c in levels:
                n = max(c, 4) * args.rounds
                b = asyncio.run(http_throughput(srv.url, uid, c, n, max_tokens=args.new))
                a = inprocess(engine, path, c, n, args.new)
                print(f"{engine:14}{c:>12}{a:15.1f}{b:15.1f}{b / a:7.2f}")
                sys.stdout.flush()
            with httpx.Client(base_url=srv.url, timeout=300) as client:
                client.delete(f"/v1/models/{uid}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
