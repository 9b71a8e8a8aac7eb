"""Benchmark: each llama.cpp backend in-process vs. the same backend behind xdask's HTTP API.

Prints, for the default model (Gemma 3 270M Q4_K_M), completions with
max_tokens=64 and temperature 0:
  * single-request p50 latency, in-process (a) and through xdask (b), with the
    requests of a and b interleaved so that both see the same machine noise;
  * completion tokens/s at concurrency 1, 4 and 16, and the ratio b/a.
Also a max_tokens=1 latency row, where the server's added cost is not hidden
by seconds of decoding. Writes results/llm.json (README: the Benchmark section).

    python tests/benchmarks/bench_llm.py [--backends xllamacpp,llama-cpp-python] [--rounds 2]

"In-process" is the library called directly (llama_baselines.py): xllamacpp's
``Server.handle_completions`` (one thread per request, the same slot count
xdask uses) and llama-cpp-python's ``Llama.create_completion`` behind a lock
(it is not thread-safe).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from typing import Any

import harness
import httpx
from llama_baselines import GEMMA, MODULES, gemma_path, inprocess_llama_cpp_python, inprocess_xllamacpp

MAX_TOKENS = 64


def bench_backend(backend: str, path: str, rounds: int, concurrencies: list[int], samples: int) -> dict[str, Any]:
    """Figures of one backend: p50 latency at 1 and ``MAX_TOKENS`` tokens, tokens/s per concurrency."""
    from xdask import config

    n_parallel = int(config.get("llama-cpp.n-parallel")) if backend == "xllamacpp" else 1
    n_ctx = int(config.get("llama-cpp.n-ctx-per-slot")) * n_parallel
    prompts = harness.STORY_PROMPTS
    with harness.local_server() as srv, httpx.Client(base_url=srv.endpoint, timeout=600) as client:
        uid = harness.launch(srv.endpoint, {**GEMMA, "model_uid": f"bench-{backend}", "llama_cpp_backend": backend})
        if backend == "xllamacpp":
            a_complete, a_close = inprocess_xllamacpp(path, n_parallel, n_ctx)
        else:
            a_complete, a_close = inprocess_llama_cpp_python(path, n_ctx)
        b_complete = harness.complete_http(client, uid)
        try:
            harness.warm_up(harness.on_prompts(a_complete, prompts, 4), harness.on_prompts(b_complete, prompts, 4))
            latency: dict[str, dict[str, float]] = {}
            for max_tokens, n in ((1, 3 * samples * rounds), (MAX_TOKENS, samples * rounds)):
                spent = harness.interleave({"a": harness.on_prompts(a_complete, prompts, max_tokens),
                                            "b": harness.on_prompts(b_complete, prompts, max_tokens)}, n)
                a, b = (statistics.median(spent[side]) * 1000 for side in ("a", "b"))
                latency[str(max_tokens)] = {"a": a, "b": b, "b_minus_a": b - a, "samples": n}
            tok_s: dict[str, dict[str, float]] = {}
            runs: dict[str, dict[str, Any]] = {}
            for c in concurrencies:
                n = max(c, 4) * rounds
                a_run = harness.run_threads(harness.on_prompts(a_complete, prompts, MAX_TOKENS), c, n)
                b_run = harness.http_completions(srv.endpoint, uid, prompts, c, MAX_TOKENS, n)
                tok_s[str(c)] = {"a": a_run.tok_s, "b": b_run.tok_s, "ratio": harness.ratio(b_run.tok_s, a_run.tok_s)}
                runs[str(c)] = {"a": a_run.figures(), "b": b_run.figures()}
        finally:
            a_close()
    return {"latency_p50_ms": latency, "tok_s": tok_s, "runs": runs}


def show(backend: str, figures: dict[str, Any]) -> None:
    """Print one backend's figures."""
    rows: list[list[Any]] = [[f"p50 latency, max_tokens={mt} (ms)", v["a"], v["b"], f"{v['b_minus_a']:+.1f}"]
                             for mt, v in figures["latency_p50_ms"].items()]
    rows += [[f"tok/s at concurrency {c}", v["a"], v["b"], f"{v['ratio']:.2f}"] for c, v in figures["tok_s"].items()]
    best_a = max(v["a"] for v in figures["tok_s"].values())
    top, last = list(figures["tok_s"].items())[-1]
    rows.append([f"c={top} xdask / best in-process", best_a, last["b"], f"{last['b'] / best_a:.2f}"])
    harness.print_table(["", "a: in-process", "b: xdask HTTP", "b - a / b/a"], rows, f"== {backend}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(MODULES))
    parser.add_argument("--rounds", type=int, default=2, help="more rounds, less noise, more minutes")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--samples", type=int, default=8,
                        help="64-token latency samples per round and side (3x as many 1-token ones)")
    harness.add_result_argument(parser, "llm")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    harness.xdask_home()
    path = gemma_path()
    print(f"model: {path}\ncpu threads: {harness.cores()}  max_tokens: {MAX_TOKENS}  temperature: 0")
    backends: dict[str, Any] = {}
    for backend in args.backends.split(","):
        if importlib.util.find_spec(MODULES[backend]) is None:
            print(f"\n{backend}: not installed, skipped")
            continue
        backends[backend] = bench_backend(backend, path, args.rounds, concurrencies, args.samples)
        show(backend, backends[backend])
    harness.write_result(args.result, {"backends": backends}, benchmark="llm",
                         packages=["xllamacpp", "llama-cpp-python"],
                         settings={"model": "gemma-3-270m ggufv2 Q4_K_M", "max_tokens": MAX_TOKENS, "temperature": 0,
                                   "rounds": args.rounds, "samples": args.samples, "concurrency": concurrencies})


if __name__ == "__main__":
    main()
