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

    python tests/benchmarks/bench_llama_cpp_batching.py [--backends llama-cpp-python,xllamacpp]
        [--rounds 3] [--concurrency 1,16] [--n-parallel 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from bench_llm import (
    MAX_TOKENS,
    MODULES,
    inprocess_llama_cpp_python,
    n_threads,
    run_threads,
)

from xdask import config
from xdask.engines.base import Delta, SamplingParams
from xdask.engines.llama_cpp import make_engine
from xdask.engines.llama_cpp.options import LlamaCppOptions
from xdask.hub import locate_model
from xdask.registry import resolve

Complete = Callable[[str, int], int]


def engine_complete(engine: Any) -> Complete:
    """``complete(prompt, max_tokens) -> completion tokens`` through an xdask engine."""

    def complete(prompt: str, max_tokens: int) -> int:
        last: list[Delta] = []
        engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                        lambda d: bool(d.finish_reason and last.append(d)))
        return last[-1].completion_tokens or 0

    return complete


def measure(sides: dict[str, Complete], concurrencies: list[int], rounds: int) -> dict[tuple[str, int], list[float]]:
    """Tokens/s of each side at each concurrency, once per round."""
    names = list(sides)
    tput: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for c in concurrencies:
            n_requests = max(c, 4)
            for name in order:
                tps = run_threads(sides[name], c, n_requests)
                tput.setdefault((name, c), []).append(tps)
                print(f"  round {r + 1}  c={c:<3} {name:<12} {tps:7.1f} tok/s", flush=True)
    return tput


def bench_backend(backend: str, path: str, n_parallel: int, concurrencies: list[int], rounds: int) -> None:
    per_slot = int(config.get("llama-cpp.n-ctx-per-slot"))
    options = LlamaCppOptions(n_ctx=per_slot * n_parallel, n_parallel=n_parallel, n_threads=n_threads(),
                              n_gpu_layers=0)
    engine = make_engine(path, backend, {"options": options})
    engine.load()
    serial_complete, serial_close = inprocess_llama_cpp_python(path, per_slot)
    sides = {"serialized": serial_complete, "batched": engine_complete(engine)}
    try:
        for complete in sides.values():  # first decodes allocate buffers
            complete("Hello", 4)
        print(f"== {backend}: batched engine with {n_parallel} slots of {per_slot} tokens")
        tput = measure(sides, concurrencies, rounds)
    finally:
        serial_close()
        engine.close()
    # The best round is the one least disturbed by other work on a shared machine.
    for label, pick in ((f"median of {rounds} rounds", statistics.median), (f"best of {rounds} rounds", max)):
        print(f"\n{label:28}{'serialized':>12}{'batched':>12}{'batched/serial':>16}")
        for c in concurrencies:
            s, b = pick(tput[("serialized", c)]), pick(tput[("batched", c)])
            print(f"{'tok/s at concurrency ' + str(c):28}{s:12.1f}{b:12.1f}{b / s:16.2f}")
    if hasattr(engine, "max_active"):
        print(f"most sequences decoded together: {engine.max_active}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="llama-cpp-python,xllamacpp")
    parser.add_argument("--rounds", type=int, default=3, help="more rounds, less noise, more minutes")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--n-parallel", type=int, default=int(config.get("llama-cpp.n-parallel")))
    args = parser.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit("llama-cpp-python is not installed: the serialized baseline needs it")
    backends = args.backends.split(",")
    missing = [b for b in backends if importlib.util.find_spec(MODULES[b]) is None]
    os.environ.setdefault("XDASK_HOME", tempfile.mkdtemp(prefix="xdask-bench-home-"))
    path = str(locate_model(resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")))
    print(f"model: {path}\ncpu threads: {n_threads()}  max_tokens: {MAX_TOKENS}  temperature: 0"
          f"{'  not installed: ' + ', '.join(missing) if missing else ''}\n")
    for backend in (b for b in backends if b not in missing):
        bench_backend(backend, path, args.n_parallel, [int(c) for c in args.concurrency.split(",")], args.rounds)


if __name__ == "__main__":
    main()
