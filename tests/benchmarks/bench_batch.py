"""Benchmark: ``ModelHandle.chat_batch`` through a running ``xdask-local`` vs. the engine in-process.

Prints completion tokens/s for N chat prompts (default 500, max_tokens 32,
temperature 0) on the default model (Gemma 3 270M Q4_K_M, xllamacpp):

  a. in-process: xllamacpp's ``Server.handle_completions`` called directly in
     this process (``llama_baselines.inprocess_xllamacpp``: same GGUF, same slot
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
several rounds and read the best. Writes results/batch.json (README: Batch).

    python tests/benchmarks/bench_batch.py [--n 500] [--max-tokens 32] [--rounds 1] [--chunk-size 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import harness
from llama_baselines import GEMMA, gemma_path, inprocess_xllamacpp

THINGS = ("dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
          "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")


def prompts(n: int) -> list[str]:
    return [f"Write one sentence about a {THINGS[i % len(THINGS)]} called number {i}." for i in range(n)]


def batch_run(model: Any, texts: list[str], max_tokens: int, chunk_size: int | None) -> tuple[harness.Run, int]:
    """(the run, its chunk tasks) of one ``chat_batch`` from submit to the last outcome.

    A batch is one call, so the run's latency is the whole batch's and its
    tokens are the sum of the outcomes' ``usage``.
    """
    start = time.perf_counter()
    batch = model.chat_batch(texts, max_tokens=max_tokens, temperature=0, chunk_size=chunk_size)
    outcomes = batch.results()
    elapsed = time.perf_counter() - start
    failed = [o["error"] for o in outcomes if o["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} items failed, e.g. {failed[0]}")
    replies = [harness.Reply(o["response"]["usage"]["completion_tokens"]) for o in outcomes]
    return harness.Run(len(texts), elapsed, replies, [elapsed] * len(replies)), len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: batch.chunk-size (0 = concurrency)")
    harness.add_result_argument(parser, "batch")
    args = parser.parse_args()

    from xdask import Client, config
    from xdask.registry import resolve
    from xdask.registry.chat_template import render_chat

    harness.xdask_home()
    path = gemma_path()
    n_parallel = int(config.get("llama-cpp.n-parallel"))
    n_ctx = int(config.get("llama-cpp.n-ctx-per-slot")) * n_parallel
    texts = prompts(args.n)
    family = resolve(GEMMA["model_name"], GEMMA["model_format"], None, GEMMA["quantization"]).family
    # The prompt xdask's engine builds for a chat request (llama.cpp adds BOS itself).
    rendered = [render_chat(family.chat_template, [{"role": "user", "content": t}]) for t in texts]
    print(f"model: {path}\ncpu threads: {harness.cores()}  slots: {n_parallel}  prompts: {args.n}  "
          f"max_tokens: {args.max_tokens}  temperature: 0\n", flush=True)

    rounds: list[dict[str, Any]] = []
    with harness.local_server() as srv:
        harness.launch(srv.endpoint, {**GEMMA, "model_uid": "bench-batch", "llama_cpp_backend": "xllamacpp"})
        client = Client(srv.endpoint)
        model = client.get_model("bench-batch")
        complete, close = inprocess_xllamacpp(path, n_parallel, n_ctx)
        try:
            # Warm both (first decodes allocate buffers; the cluster imports the runner).
            harness.run_threads(harness.on_prompts(complete, rendered, 4), n_parallel, n_parallel)
            batch_run(model, texts[:n_parallel], 4, args.chunk_size)
            for rnd in range(args.rounds):
                a = harness.run_threads(harness.on_prompts(complete, rendered, args.max_tokens), len(rendered),
                                        len(rendered))
                print(f"round {rnd + 1}  a in-process      {a.tok_s:8.1f} tok/s  ({a.wall_s:.1f} s)", flush=True)
                b, chunks = batch_run(model, texts, args.max_tokens, args.chunk_size)
                print(f"round {rnd + 1}  b xdask chat_batch {b.tok_s:8.1f} tok/s  ({b.wall_s:.1f} s, {chunks} chunks)",
                      flush=True)
                rounds.append({"a": a.tok_s, "b": b.tok_s, "ratio": harness.ratio(b.tok_s, a.tok_s),
                               "a_s": a.wall_s, "b_s": b.wall_s, "chunks": chunks})
        finally:
            close()
            client.close()
    summary = {}
    for label, pick in (("best", max), ("median", statistics.median)):
        a, b = pick(r["a"] for r in rounds), pick(r["b"] for r in rounds)
        summary[label] = {"a": a, "b": b, "ratio": harness.ratio(b, a)}
    harness.print_table(["", "a: in-process tok/s", "b: chat_batch tok/s", "b/a"],
                        [[f"{label} round", v["a"], v["b"], v["ratio"]] for label, v in summary.items()])
    harness.write_result(args.result, {"rounds": rounds, **summary}, benchmark="batch", packages=["xllamacpp"],
                         settings={"model": "gemma-3-270m ggufv2 Q4_K_M", "n": args.n, "max_tokens": args.max_tokens,
                                   "temperature": 0, "rounds": args.rounds, "slots": n_parallel,
                                   "chunk_size": args.chunk_size, "threads": harness.cores()})


if __name__ == "__main__":
    main()
