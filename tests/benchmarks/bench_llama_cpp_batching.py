"""Benchmark: xdask's batched llama.cpp engines vs. llama-cpp-python serialized, in-process.

For the default model (Gemma 3 270M Q4_K_M), completions with max_tokens=64
and temperature 0, prints completion tokens/s at concurrency 1 and 16 for

  * serialized: llama-cpp-python's ``Llama.create_completion`` behind a lock
    (one request at a time: what the llama-cpp-python backend used to do);
  * batched: each installed backend's xdask engine (``LlamaCppPythonEngine``,
    ``XllamacppEngine``) with ``n_parallel`` slots, called from one thread
    per request as the model actor does;

and the ratio batched / serialized. Both run in the same process and the
same rounds, alternating which goes first, so they see the same machine
noise; the summary gives the median and the best round (every round is
printed too: on a shared machine single rounds can be several times off).
Writes results/llama-cpp-batching.json (README: Engines).

    python tests/benchmarks/bench_llama_cpp_batching.py [--backends llama-cpp-python,xllamacpp]
        [--rounds 3] [--concurrency 1,16] [--n-parallel 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from typing import Any

import harness
from llama_baselines import MODULES, gemma_path, inprocess_llama_cpp_python

MAX_TOKENS = 64


def bench_backend(backend: str, path: str, n_parallel: int, concurrencies: list[int], rounds: int) -> dict[str, Any]:
    """Per concurrency: serialized and batched tokens/s (median, best, every round) and their ratios."""
    from xdask import config
    from xdask.engines.llama_cpp import build_engine as make_engine
    from xdask.engines.llama_cpp.options import LlamaCppOptions

    per_slot = int(config.get("llama-cpp.n-ctx-per-slot"))
    options = LlamaCppOptions(n_ctx=per_slot * n_parallel, n_parallel=n_parallel, n_threads=harness.cores(),
                              n_gpu_layers=0)
    engine = make_engine(path, backend, {"options": options})
    engine.load()
    serial_complete, serial_close = inprocess_llama_cpp_python(path, per_slot)
    sides = {"serialized": serial_complete, "batched": harness.engine_complete(engine)}
    per_c: dict[str, Any] = {}
    figures: dict[str, Any] = {"concurrency": per_c}
    try:
        harness.warm_up(*(harness.on_prompts(c, ["Hello"], 4) for c in sides.values()))  # buffers
        print(f"\n== {backend}: batched engine with {n_parallel} slots of {per_slot} tokens")
        for c in concurrencies:
            def rate(complete: harness.Complete, c: int = c) -> float:
                return harness.run_threads(harness.on_prompts(complete, harness.STORY_PROMPTS, MAX_TOKENS), c,
                                           max(c, 4)).tok_s

            tput = harness.alternate({name: (lambda s=complete: rate(s)) for name, complete in sides.items()}, rounds)
            for r in range(rounds):
                print(f"  round {r + 1}  c={c:<3} serialized {tput['serialized'][r]:7.1f}  "
                      f"batched {tput['batched'][r]:7.1f} tok/s", flush=True)
            s, b = statistics.median(tput["serialized"]), statistics.median(tput["batched"])
            sb, bb = max(tput["serialized"]), max(tput["batched"])
            per_c[str(c)] = {"serialized": s, "batched": b, "ratio": harness.ratio(b, s),
                               "serialized_best": sb, "batched_best": bb, "best_ratio": harness.ratio(bb, sb),
                               "serialized_rounds": tput["serialized"], "batched_rounds": tput["batched"]}
    finally:
        serial_close()
        engine.close()
    # The best round is the one least disturbed by other work on a shared machine.
    for label, suffix in ((f"median of {rounds} rounds", ""), (f"best of {rounds} rounds", "_best")):
        harness.print_table(
            [label, "serialized", "batched", "batched/serial"],
            [[f"tok/s at concurrency {c}", v[f"serialized{suffix}"], v[f"batched{suffix}"],
              v["ratio" if not suffix else "best_ratio"]] for c, v in per_c.items()])
    if hasattr(engine, "max_active"):
        print(f"most sequences decoded together: {engine.max_active}")
        figures["max_active"] = engine.max_active
    return figures


def main() -> None:
    from xdask import config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="llama-cpp-python,xllamacpp")
    parser.add_argument("--rounds", type=int, default=3, help="more rounds, less noise, more minutes")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--n-parallel", type=int, default=int(config.get("llama-cpp.n-parallel")))
    harness.add_result_argument(parser, "llama-cpp-batching")
    args = parser.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit("llama-cpp-python is not installed: the serialized baseline needs it")
    backends = args.backends.split(",")
    missing = [b for b in backends if importlib.util.find_spec(MODULES[b]) is None]
    harness.xdask_home()
    path = gemma_path()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"model: {path}\ncpu threads: {harness.cores()}  max_tokens: {MAX_TOKENS}  temperature: 0"
          f"{'  not installed: ' + ', '.join(missing) if missing else ''}")
    figures = {b: bench_backend(b, path, args.n_parallel, concurrencies, args.rounds)
               for b in backends if b not in missing}
    harness.write_result(args.result, {"backends": figures}, benchmark="llama-cpp-batching",
                         packages=["llama-cpp-python", "xllamacpp"],
                         settings={"model": "gemma-3-270m ggufv2 Q4_K_M", "max_tokens": MAX_TOKENS, "temperature": 0,
                                   "rounds": args.rounds, "n_parallel": args.n_parallel, "summary": "median"})


if __name__ == "__main__":
    main()
