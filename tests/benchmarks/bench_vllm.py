"""Benchmark: xdask's VLLMEngine vs. vLLM's AsyncLLM used directly, in one process.

Prints completion tokens/s at concurrency 1 and 16 on the tiny random Qwen2
(greedy, the same prompts on both sides, so both produce the same tokens),
and the ratio engine / direct. Rounds alternate the two sides so that both
see the same machine noise; the median round is reported.

    python tests/benchmarks/bench_vllm.py [--max-tokens 128] [--rounds 3] [--requests 32] [--engine-kwargs JSON]

"Direct" is what a vLLM user writes: one ``AsyncLLM`` driven from an asyncio
loop on the main thread, one task per in-flight request iterating
``generate`` with ``RequestOutputKind.DELTA``. The engine side is what xdask
does: one thread per request calling ``VLLMEngine.generate`` with an ``emit``
callback, the requests carried to the engine's private loop and back. Both
engines are built from the same engine arguments (the engine's resolved
defaults) and stay loaded; only one side runs at a time.

vLLM spawns its engine core: run this file as a script (its ``__main__``
guard matters), with ``VLLM_HOST_IP=127.0.0.1`` on hosts without a route.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

PROMPTS = [f"Write a short story about a {thing}." for thing in (
    "dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
    "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")]


def engine_side(engine: Any, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[int, float]:
    """Completion tokens and seconds for ``prompts`` through ``VLLMEngine.generate`` threads."""
    from xdask.engines.base import Delta, SamplingParams

    counts: list[int] = []
    lock = threading.Lock()
    pending = list(prompts)

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            last: list[Delta] = []

            def emit(delta: Delta, last: list[Delta] = last) -> bool:
                if delta.finish_reason is not None:
                    last.append(delta)
                return False

            engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), emit)
            with lock:
                counts.append(last[-1].completion_tokens or 0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


async def direct_side(llm: Any, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[int, float]:
    """The same requests through ``AsyncLLM.generate`` tasks on this loop."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    pending = list(prompts)
    counts: list[int] = []

    async def worker() -> None:
        while pending:
            prompt = pending.pop()
            sp = VSamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA)
            n = 0
            async for out in llm.generate(prompt, sp, uuid.uuid4().hex):
                n += len(out.outputs[0].token_ids)
            counts.append(n)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(counts), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="requests per round at concurrency 16")
    parser.add_argument("--engine-kwargs", type=json.loads, default={},
                        help='vLLM launch options for both sides, e.g. \'{"enforce_eager": false}\'')
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

    from tiny_models import build_tiny_qwen2
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from xdask.engines.vllm_engine import make_engine

    with tempfile.TemporaryDirectory() as tmp:
        # hidden=128: vLLM's CPU attention needs a head size >= 32.
        path = str(build_tiny_qwen2(Path(tmp) / "tiny-qwen2", hidden=128))
        engine = make_engine(path, 2048, args.engine_kwargs)
        t0 = time.perf_counter()
        engine.load()
        engine_load = time.perf_counter() - t0

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def build() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine.options.engine_args(path)))

        t0 = time.perf_counter()
        direct = loop.run_until_complete(build())
        direct_load = time.perf_counter() - t0

        # Warm both (first requests pay for allocator and thread start-up).
        engine_side(engine, PROMPTS[:2], 2, 8)
        loop.run_until_complete(direct_side(direct, PROMPTS[:2], 2, 8))

        results: dict[str, Any] = {"max_tokens": args.max_tokens, "rounds": args.rounds,
                                   "load_s": {"engine": round(engine_load, 1), "direct": round(direct_load, 1)},
                                   "dtype": engine.options.dtype, "engine_kwargs": args.engine_kwargs}
        for concurrency in (1, 16):
            n_requests = 4 if concurrency == 1 else args.requests
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
            rates: dict[str, list[float]] = {"engine": [], "direct": []}
            tokens: dict[str, set[int]] = {"engine": set(), "direct": set()}
            for _ in range(args.rounds):
                n, secs = engine_side(engine, prompts, concurrency, args.max_tokens)
                rates["engine"].append(n / secs)
                tokens["engine"].add(n)
                n, secs = loop.run_until_complete(direct_side(direct, prompts, concurrency, args.max_tokens))
                rates["direct"].append(n / secs)
                tokens["direct"].add(n)
            if tokens["engine"] != tokens["direct"]:
                print(f"warning: token counts differ: {tokens}", file=sys.stderr)
            e, d = statistics.median(rates["engine"]), statistics.median(rates["direct"])
            results[f"c{concurrency}"] = {
                "requests": n_requests,
                "completion_tokens": sorted(tokens["engine"]),
                "engine_tok_s": round(e, 1),
                "direct_tok_s": round(d, 1),
                "ratio": round(e / d, 3),
                "engine_rounds": [round(r, 1) for r in rates["engine"]],
                "direct_rounds": [round(r, 1) for r in rates["direct"]],
            }

        engine.close()

        async def stop(llm: Any) -> None:
            llm.shutdown()
            await asyncio.sleep(0.1)  # let the output handler's cancellation run

        loop.run_until_complete(stop(direct))
        del direct  # now, not in __del__ at interpreter exit (vLLM's globals are gone by then)
        gc.collect()
        loop.close()

    print()
    print(f"vLLM engine vs AsyncLLM direct, tiny Qwen2 (dtype {results['dtype']}, options {args.engine_kwargs}), "
          f"{args.max_tokens} max tokens, median of {args.rounds} rounds")
    print(f"load: engine {results['load_s']['engine']} s (incl. 1-token warm-up), direct {results['load_s']['direct']} s")
    print(f"{'concurrency':>11} {'requests':>8} {'engine tok/s':>13} {'direct tok/s':>13} {'ratio':>6}")
    for concurrency in (1, 16):
        r = results[f"c{concurrency}"]
        print(f"{concurrency:>11} {r['requests']:>8} {r['engine_tok_s']:>13} {r['direct_tok_s']:>13} {r['ratio']:>6}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
