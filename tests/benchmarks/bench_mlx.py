"""Benchmark: xdask's MLXEngine vs. mlx-lm called directly, in one process.

Prints completion tokens/s at concurrency 1 and 16 on the tiny random Qwen2
(greedy, the same prompts on both sides, so both produce the same tokens),
and the ratio engine / direct. Rounds alternate the two sides so that both
see the same machine noise; the median round is reported.

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
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import build_tiny_qwen2

from xdask.engines.base import SamplingParams
from xdask.engines.mlx_engine import MLXEngine, make_engine, rope_overrides

PROMPTS = [f"Write a short story about a {thing}." for thing in (
    "dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
    "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")]


def engine_side(engine: MLXEngine, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[int, float]:
    """Completion tokens and seconds for ``prompts`` through ``engine.generate``."""
    counts: list[int] = []
    lock = threading.Lock()
    pending = list(prompts)

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop(0)
            deltas: list[Any] = []
            engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), _collect(deltas))
            with lock:
                counts.append(deltas[-1].completion_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def _collect(deltas: list[Any]) -> Callable[[Any], bool]:
    def emit(delta: Any) -> bool:
        deltas.append(delta)
        return False

    return emit


def direct_side(model: Any, tokenizer: Any, prompts: list[str], concurrency: int, max_tokens: int,
                batch_size: int) -> tuple[int, float]:
    """The same work through mlx-lm's own API on this thread."""
    from mlx_lm import batch_generate, stream_generate

    ids = [tokenizer.encode(p) for p in prompts]
    t0 = time.perf_counter()
    if concurrency == 1:
        tokens = 0
        for prompt in ids:
            for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
                last = response
            tokens += last.generation_tokens  # counts a final EOS, as the engine does
        return tokens, time.perf_counter() - t0
    result = batch_generate(model, tokenizer, ids, max_tokens=max_tokens, return_token_ids=True,
                            completion_batch_size=batch_size, prefill_batch_size=min(8, batch_size))
    # Its texts drop a final EOS; its stats count it, as the engine does.
    return result.stats.generation_tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width (64: the test fixture)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm
    from mlx_lm import load

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_qwen2(Path(tmp) / "tiny", layers=args.layers, hidden=args.hidden)
        engine = make_engine(str(path), 2048, {"max_batch_size": 16})
        engine.load()
        # The direct side loads the same files with the same RoPE fix the engine applies.
        overrides = rope_overrides(json.loads((path / "config.json").read_text()))
        model, tokenizer = load(str(path), model_config=overrides or None)

        print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, device {mx.default_device()}, "
              f"tiny Qwen2 hidden={args.hidden} layers={args.layers}, greedy, max_tokens={args.max_tokens}")
        runs: dict[tuple[str, int], list[float]] = {}
        token_counts: dict[tuple[str, int], int] = {}
        def prompts(concurrency: int) -> list[str]:
            return PROMPTS[:4] if concurrency == 1 else PROMPTS[:concurrency]

        sides: dict[str, Callable[[int], tuple[int, float]]] = {
            "direct": lambda c: direct_side(model, tokenizer, prompts(c), c, args.max_tokens, 16),
            "engine": lambda c: engine_side(engine, prompts(c), c, args.max_tokens),
        }
        for name, side in sides.items():  # warm-up: compile kernels, fill allocator caches
            side(1)
            side(16)
        for _ in range(args.rounds):
            for concurrency in (1, 16):
                for name, side in sides.items():
                    tokens, seconds = side(concurrency)
                    runs.setdefault((name, concurrency), []).append(tokens / seconds)
                    token_counts[(name, concurrency)] = tokens
        engine.close()

    print(f"{'concurrency':>11} {'direct tok/s':>13} {'engine tok/s':>13} {'engine/direct':>14} {'tokens d/e':>11}")
    for concurrency in (1, 16):
        direct = statistics.median(runs[("direct", concurrency)])
        eng = statistics.median(runs[("engine", concurrency)])
        counts = f"{token_counts[('direct', concurrency)]}/{token_counts[('engine', concurrency)]}"
        print(f"{concurrency:>11} {direct:>13.0f} {eng:>13.0f} {eng / direct:>14.2f} {counts:>11}")


if __name__ == "__main__":
    main()
