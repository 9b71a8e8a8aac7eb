"""Benchmark: xdask's MLXEngine vs. mlx-lm called directly, in one process.

Prints completion tokens/s at concurrency 1 and 16 on the tiny random Qwen2
(greedy, the same prompts on both sides, so both produce the same tokens),
and the ratio engine / direct. Rounds alternate the two sides so that both
see the same machine noise; the median round is reported. Writes
results/mlx.json.

    python tests/benchmarks/bench_mlx.py [--max-tokens 128] [--rounds 3] [--hidden 64 --layers 2]

"Direct" is mlx-lm's own API on the calling thread: ``stream_generate`` one
request after another at concurrency 1, and one ``batch_generate`` call with
all prompts at concurrency 16 (its BatchGenerator, the same one the engine
drives, with the same batch size). The engine side is what xdask does: one
thread per request calling ``MLXEngine.generate`` with an ``emit`` callback,
the requests decoded together on the engine's MLX thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

LEVELS = (1, 16)


def prompts(concurrency: int) -> list[str]:
    return harness.STORY_PROMPTS[:4] if concurrency == 1 else harness.STORY_PROMPTS[:concurrency]


def direct_side(model: Any, tokenizer: Any, texts: list[str], concurrency: int, max_tokens: int,
                batch_size: int) -> tuple[int, float]:
    """(completion tokens, seconds) of the same work through mlx-lm's own API on this thread.

    Tokens are mlx-lm's own counts (``generation_tokens``), which include a
    final EOS, as the engine's do.
    """
    from mlx_lm import batch_generate, stream_generate

    ids = [tokenizer.encode(p) for p in texts]
    t0 = time.perf_counter()
    if concurrency == 1:
        tokens = 0
        for prompt in ids:
            for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
                last = response
            tokens += last.generation_tokens
        return tokens, time.perf_counter() - t0
    result = batch_generate(model, tokenizer, ids, max_tokens=max_tokens, return_token_ids=True,
                            completion_batch_size=batch_size, prefill_batch_size=min(8, batch_size))
    return result.stats.generation_tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width (64: the test fixture)")
    parser.add_argument("--layers", type=int, default=2)
    harness.add_result_argument(parser, "mlx")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm
    from mlx_lm import load
    from support.tiny_models import build_tiny_qwen2

    from xdask.engines.mlx_engine import build_engine as make_engine
    from xdask.engines.mlx_engine import rope_overrides

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_qwen2(Path(tmp) / "tiny", layers=args.layers, hidden=args.hidden)
        engine = make_engine(str(path), 2048, {"max_batch_size": 16})
        engine.load()
        # The direct side loads the same files with the same RoPE fix the engine applies.
        overrides = rope_overrides(json.loads((path / "config.json").read_text()))
        model, tokenizer = load(str(path), model_config=overrides or None)
        print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, device {mx.default_device()}, "
              f"tiny Qwen2 hidden={args.hidden} layers={args.layers}, greedy, max_tokens={args.max_tokens}")
        complete = harness.engine_complete(engine)

        def engine_side(c: int) -> tuple[int, float]:
            run = harness.run_threads(harness.on_prompts(complete, prompts(c), args.max_tokens), c, len(prompts(c)))
            return run.tokens, run.wall_s

        def side(name: str, c: int) -> Any:
            if name == "direct":
                return lambda: direct_side(model, tokenizer, prompts(c), c, args.max_tokens, 16)
            return lambda: engine_side(c)

        for c in LEVELS:  # warm-up, one unmeasured round: compile kernels, fill allocator caches
            harness.alternate({name: side(name, c) for name in ("direct", "engine")}, 1)
        figures: dict[str, Any] = {}
        for c in LEVELS:
            runs = harness.alternate({name: side(name, c) for name in ("direct", "engine")}, args.rounds)
            rates = {name: [tokens / secs for tokens, secs in done] for name, done in runs.items()}
            d, e = statistics.median(rates["direct"]), statistics.median(rates["engine"])
            figures[str(c)] = {"direct_tok_s": d, "engine_tok_s": e, "ratio": harness.ratio(e, d),
                               "tokens": {name: done[-1][0] for name, done in runs.items()},
                               "direct_rounds": rates["direct"], "engine_rounds": rates["engine"]}
        engine.close()

    harness.print_table(["concurrency", "direct tok/s", "engine tok/s", "engine/direct", "tokens d/e"],
                        [[c, f"{v['direct_tok_s']:.0f}", f"{v['engine_tok_s']:.0f}", v["ratio"],
                          f"{v['tokens']['direct']}/{v['tokens']['engine']}"] for c, v in figures.items()])
    harness.write_result(args.result, {"concurrency": figures}, benchmark="mlx", packages=["mlx", "mlx-cpu", "mlx-lm"],
                         settings={"model": f"tiny random Qwen2 (hidden {args.hidden}, {args.layers} layers)",
                                   "max_tokens": args.max_tokens, "rounds": args.rounds,
                                   "device": str(mx.default_device())})


if __name__ == "__main__":
    main()
