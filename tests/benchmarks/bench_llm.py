"""Benchmark: each llama.cpp backend in-process vs. the same backend behind xdask's HTTP API.

Prints, for the default model (Gemma 3 270M Q4_K_M), completions with
max_tokens=64 and temperature 0:
  * single-request p50 latency, in-process (a) and through xdask (b), with the
    requests of a and b interleaved so that both see the same machine noise;
  * completion tokens/s at concurrency 1, 4 and 16, and the ratio b/a.
Also a max_tokens=1 latency row, where the server's added cost is not hidden
by seconds of decoding.

    python tests/benchmarks/bench_llm.py [--backends xllamacpp,llama-cpp-python] [--rounds 2]

"In-process" is the library called directly: xllamacpp's ``Server.handle_completions``
(one thread per request, the same slot count xdask uses) and llama-cpp-python's
``Llama.create_completion`` behind a lock (it is not thread-safe).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from xdask import config
from xdask.hub import locate_model
from xdask.registry import resolve

MAX_TOKENS = 64
PROMPTS = [f"Write a short story about a {thing}." for thing in (
    "dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
    "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")]
MODULES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}


def n_threads() -> int:
    return len(os.sched_getaffinity(0))


# -- (a) the backend in-process ------------------------------------------------------


def inprocess_xllamacpp(path: str, n_parallel: int, n_ctx: int) -> tuple[Callable[[str, int], int], Callable[[], None]]:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    params.cpuparams.n_threads = n_threads()
    params.cpuparams_batch.n_threads = n_threads()
    params.verbosity = -1
    server = xllamacpp.Server(params)

    def complete(prompt: str, max_tokens: int) -> int:
        out: list[Any] = []
        server.handle_completions({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, out.append)
        return out[-1]["usage"]["completion_tokens"]

    def close() -> None:
        nonlocal server
        server = None

    return complete, close


def inprocess_llama_cpp_python(path: str, n_ctx: int) -> tuple[Callable[[str, int], int], Callable[[], None]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads(), n_threads_batch=n_threads(), verbose=False)
    lock = threading.Lock()

    def complete(prompt: str, max_tokens: int) -> int:
        with lock:
            return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)["usage"]["completion_tokens"]

    return complete, llm.close


def run_threads(complete: Callable[[str, int], int], concurrency: int, n_requests: int) -> float:
    """Completion tokens per second with ``concurrency`` threads."""
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(lambda i: complete(PROMPTS[i % len(PROMPTS)], MAX_TOKENS), range(n_requests)))
        return tokens / (time.perf_counter() - start)


# -- (b) through xdask's HTTP API ------------------------------------------------------


class XdaskLocal:
    def __init__(self, home: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xdask.cli_local", "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "XDASK_HOME": home}, start_new_session=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("Press Ctrl-C"):
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


def http_complete_sync(client: httpx.Client, uid: str) -> Callable[[str, int], int]:
    def complete(prompt: str, max_tokens: int) -> int:
        r = client.post("/v1/completions", json={"model": uid, "prompt": prompt, "max_tokens": max_tokens,
                                                 "temperature": 0})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return complete


async def http_throughput(url: str, uid: str, concurrency: int, n_requests: int, max_tokens: int = MAX_TOKENS) -> float:
    """Tokens/s with ``concurrency`` requests in flight from one asyncio loop (cheap client)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue = list(range(n_requests))
        total = 0

        async def worker() -> None:
            nonlocal total
            while queue:
                i = queue.pop()
                r = await client.post("/v1/completions", json={"model": uid, "prompt": PROMPTS[i % len(PROMPTS)],
                                                               "max_tokens": max_tokens, "temperature": 0})
                r.raise_for_status()
                total += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


# -- driver --------------------------------------------------------------------------


def timed(complete: Callable[[str, int], int], prompt: str, max_tokens: int) -> float:
    """Seconds one request takes."""
    start = time.perf_counter()
    complete(prompt, max_tokens)
    return time.perf_counter() - start


def bench_backend(backend: str, path: str, rounds: int, concurrencies: list[int], samples: int) -> dict[str, Any]:
    n_parallel = int(config.get("llama-cpp.n-parallel")) if backend == "xllamacpp" else 1
    n_ctx = int(config.get("llama-cpp.n-ctx-per-slot")) * n_parallel
    home = tempfile.mkdtemp(prefix="xdask-bench-")
    srv = XdaskLocal(home)
    uid = f"bench-{backend}"
    try:
        with httpx.Client(base_url=srv.url, timeout=600) as client:
            r = client.post("/v1/models", json={"model_name": "gemma-3-270m", "model_engine": "llama.cpp",
                                                "model_format": "ggufv2", "quantization": "Q4_K_M",
                                                "model_uid": uid, "llama_cpp_backend": backend})
            r.raise_for_status()
            if backend == "xllamacpp":
                a_complete, a_close = inprocess_xllamacpp(path, n_parallel, n_ctx)
            else:
                a_complete, a_close = inprocess_llama_cpp_python(path, n_ctx)
            b_complete = http_complete_sync(client, uid)
            # Warm both (first decode allocates buffers).
            a_complete(PROMPTS[0], 4), b_complete(PROMPTS[0], 4)
            lat: dict[tuple[str, int], list[float]] = {}
            for max_tokens, n in ((1, 3 * samples * rounds), (MAX_TOKENS, samples * rounds)):
                for i in range(n):  # interleaved: a, b, a, b, ... on the same prompts
                    prompt = PROMPTS[i % len(PROMPTS)]
                    lat.setdefault(("a", max_tokens), []).append(timed(a_complete, prompt, max_tokens))
                    lat.setdefault(("b", max_tokens), []).append(timed(b_complete, prompt, max_tokens))
            tput: dict[tuple[str, int], float] = {}
            for c in concurrencies:
                n_requests = max(c, 4) * rounds
                tput[("a", c)] = run_threads(a_complete, c, n_requests)
                tput[("b", c)] = asyncio.run(http_throughput(srv.url, uid, c, n_requests))
            a_close()
    finally:
        srv.stop()
    return {"lat": {k: statistics.median(v) for k, v in lat.items()}, "tput": tput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(MODULES))
    parser.add_argument("--rounds", type=int, default=2, help="more rounds, less noise, more minutes")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--samples", type=int, default=8,
                        help="64-token latency samples per round and side (3x as many 1-token ones)")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("XDASK_HOME", tempfile.mkdtemp(prefix="xdask-bench-home-"))
    path = str(locate_model(resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")))
    print(f"model: {path}\ncpu threads: {n_threads()}  max_tokens: {MAX_TOKENS}  temperature: 0\n")
    for backend in args.backends.split(","):
        if importlib.util.find_spec(MODULES[backend]) is None:
            print(f"{backend}: not installed, skipped\n")
            continue
        res = bench_backend(backend, path, args.rounds, concurrencies, args.samples)
        lat, tput = res["lat"], res["tput"]
        print(f"== {backend}")
        print(f"{'':34}{'a: in-process':>15}{'b: xdask HTTP':>15}{'b - a / b/a':>14}")
        for mt in (1, MAX_TOKENS):
            a, b = lat[("a", mt)] * 1000, lat[("b", mt)] * 1000
            print(f"{'p50 latency, max_tokens=' + str(mt) + ' (ms)':34}{a:15.1f}{b:15.1f}{b - a:+14.1f}")
        best_a = max(tput[("a", c)] for c in concurrencies)
        for c in concurrencies:
            a, b = tput[("a", c)], tput[("b", c)]
            print(f"{'tok/s at concurrency ' + str(c):34}{a:15.1f}{b:15.1f}{b / a:14.2f}")
        top = max(concurrencies)
        print(f"{'c=' + str(top) + ' xdask / best in-process':34}{best_a:15.1f}{tput[('b', top)]:15.1f}"
              f"{tput[('b', top)] / best_a:14.2f}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
