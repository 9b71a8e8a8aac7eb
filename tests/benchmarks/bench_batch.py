"""Benchmark: ``ModelHandle.chat_batch`` through a running ``xdask-local`` vs. the engine in-process.

Prints completion tokens/s for N chat prompts (default 500, max_tokens 32,
temperature 0) on the default model (Gemma 3 270M Q4_K_M, xllamacpp):

  a. in-process: xllamacpp's ``Server.handle_completions`` called directly in
     this process (``bench_llm.inprocess_xllamacpp``: same GGUF, same slot
     count and threads as xdask's engine), every request submitted at once from
     its own thread; each prompt is the chat prompt xdask's engine builds (the
     family's template; its stop words are Gemma's end-of-generation tokens,
     where llama.cpp stops anyway), so both sides decode the same tokens;
  b. xdask: ``chat_batch`` (chunk tasks of the batch runner on the local
     cluster), from submit to the last outcome gathered;

and the ratio b / a (target >= 0.9). Rounds alternate a, b, a, b, ... so
both see the same machine noise; the ratio is printed for the best round of
each side (the machine's capacity) and for the medians. On a shared 2-core
machine a round can drop 5-15x on either side when other processes take a
core (llama.cpp's threads wait for each other at every decode step): use
several rounds and read the best.

    python tests/benchmarks/bench_batch.py [--n 500] [--max-tokens 32] [--rounds 1] [--chunk-size 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from bench_llm import XdaskLocal, inprocess_xllamacpp, n_threads

from xdask import Client, config
from xdask.hub import locate_model
from xdask.registry import resolve
from xdask.registry.chat_template import render_chat

THINGS = ("dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
          "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")


def prompts(n: int) -> list[str]:
    return [f"Write one sentence about a {THINGS[i % len(THINGS)]} called number {i}." for i in range(n)]


def inprocess_tps(complete: Any, rendered: list[str], max_tokens: int) -> tuple[float, float]:
    """(tokens/s, seconds) with every request in flight at once, one thread each."""
    with ThreadPoolExecutor(len(rendered)) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(lambda p: complete(p, max_tokens), rendered))
        elapsed = time.perf_counter() - start
    return tokens / elapsed, elapsed


def batch_tps(model: Any, texts: list[str], max_tokens: int, chunk_size: int | None) -> tuple[float, float, int]:
    """(tokens/s, seconds, chunks) of one ``chat_batch`` from submit to the last outcome."""
    start = time.perf_counter()
    batch = model.chat_batch(texts, max_tokens=max_tokens, temperature=0, chunk_size=chunk_size)
    outcomes = batch.results()
    elapsed = time.perf_counter() - start
    failed = [o["error"] for o in outcomes if o["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} items failed, e.g. {failed[0]}")
    tokens = sum(o["response"]["usage"]["completion_tokens"] for o in outcomes)
    return tokens / elapsed, elapsed, len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: batch.chunk-size (0 = concurrency)")
    args = parser.parse_args()
    os.environ.setdefault("XDASK_HOME", tempfile.mkdtemp(prefix="xdask-bench-home-"))
    resolved = resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")
    path = str(locate_model(resolved))
    n_parallel = int(config.get("llama-cpp.n-parallel"))
    n_ctx = int(config.get("llama-cpp.n-ctx-per-slot")) * n_parallel
    texts = prompts(args.n)
    family = resolved.family
    # The prompt xdask's engine builds for a chat request (llama.cpp adds BOS itself).
    rendered = [render_chat(family.chat_template, [{"role": "user", "content": t}]) for t in texts]
    print(f"model: {path}\ncpu threads: {n_threads()}  slots: {n_parallel}  prompts: {args.n}  "
          f"max_tokens: {args.max_tokens}  temperature: 0\n", flush=True)

    srv = XdaskLocal(tempfile.mkdtemp(prefix="xdask-bench-"))
    a_tps: list[float] = []
    b_tps: list[float] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=600) as http:
            r = http.post("/v1/models", json={"model_name": "gemma-3-270m", "model_engine": "llama.cpp",
                                              "model_format": "ggufv2", "quantization": "Q4_K_M",
                                              "model_uid": "bench-batch", "llama_cpp_backend": "xllamacpp"})
            r.raise_for_status()
        client = Client(srv.url)
        model = client.get_model("bench-batch")
        complete, close = inprocess_xllamacpp(path, n_parallel, n_ctx)
        # Warm both (first decodes allocate buffers; the cluster imports the runner).
        inprocess_tps(complete, rendered[:n_parallel], 4)
        batch_tps(model, texts[:n_parallel], 4, args.chunk_size)
        for rnd in range(args.rounds):
            tps, secs = inprocess_tps(complete, rendered, args.max_tokens)
            a_tps.append(tps)
            print(f"round {rnd + 1}  a in-process      {tps:8.1f} tok/s  ({secs:.1f} s)", flush=True)
            tps, secs, chunks = batch_tps(model, texts, args.max_tokens, args.chunk_size)
            b_tps.append(tps)
            print(f"round {rnd + 1}  b xdask chat_batch {tps:8.1f} tok/s  ({secs:.1f} s, {chunks} chunks)",
                  flush=True)
        close()
        client.close()
    finally:
        srv.stop()
    best_a, best_b = max(a_tps), max(b_tps)
    med_a, med_b = statistics.median(a_tps), statistics.median(b_tps)
    print(f"\nbest round:   in-process {best_a:.1f} tok/s, xdask chat_batch {best_b:.1f} tok/s, "
          f"ratio b/a = {best_b / best_a:.2f}")
    print(f"median round: in-process {med_a:.1f} tok/s, xdask chat_batch {med_b:.1f} tok/s, "
          f"ratio b/a = {med_b / med_a:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
