"""Benchmark: what the Jupyter extension's proxy and the dashboard's statistics cost.

Starts ``xdask-local`` (the default model, Gemma 3 270M Q4_K_M) and a real
``jupyter server`` whose xdask extension proxies to it, then drives streamed chat
completions (max_tokens 32) at concurrency 1 and 8, alternating rounds:

  * direct: ``{xdask}/v1/chat/completions``;
  * proxied: ``{jupyter}/xdask/api/v1/chat/completions`` (the token as API key).

It prints tokens/s, mean time to first token and the ratio proxied ÷ direct
(same processes, same run; rounds alternate so drift hits both). It also times
the per-request statistics the dashboard keeps (``RequestStats``) in-process.
Writes results/jupyter-proxy.json.

    python tests/benchmarks/bench_jupyter_proxy.py [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import httpx
from support.servers import DEFAULT_LAUNCH, free_port, wait_until

MAX_TOKENS = 32
TOKEN = "bench"


def _drive(url: str, headers: dict[str, str], uid: str, concurrency: int, seconds: float) -> harness.Run:
    """Streamed chats at ``url`` with ``concurrency`` in flight for ``seconds``."""

    async def go() -> harness.Run:
        async with harness.async_client("", concurrency, headers, timeout=120) as http:
            return await harness.run_async(
                lambda i: harness.astream_chat(http, url, uid, f"Tell me story {i % concurrency}.", MAX_TOKENS),
                concurrency, seconds=seconds)

    return asyncio.run(go())


def _mean_ttft_ms(run: harness.Run) -> float:
    ttfts = [r.ttft_s for r in run.replies if r.ttft_s is not None]
    return statistics.fmean(ttfts) * 1000 if ttfts else math.nan


def _stats_cost(n: int = 200_000) -> float:
    """Microseconds the dashboard's statistics add to one request of 32 messages."""
    from xdask_server.stats import RequestStats

    stats = RequestStats()
    msg = {"t": "x", "f": None}
    t0 = time.perf_counter()
    for _ in range(n // 32):
        with stats.track("m", True) as tracker:
            for _ in range(32):
                tracker.message(msg)
    return (time.perf_counter() - t0) / (n // 32) * 1e6


def _ok(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    harness.add_result_argument(parser, "jupyter-proxy")
    args = parser.parse_args()
    stats_us = _stats_cost()
    print(f"dashboard statistics: {stats_us:.1f} us per request of 32 messages (in-process)")
    levels: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, harness.local_server(Path(tmp) / "xdask") as server:
        home = Path(tmp)
        port = free_port()
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "cfg"), "JUPYTER_DATA_DIR": str(home / "data"),
               "JUPYTER_RUNTIME_DIR": str(home / "rt"), "XDASK_HOME": str(home / "xdask")}
        lab = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={port}",
             "--ip=127.0.0.1", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={tmp}",
             f"--XdaskExtension.endpoint={server.endpoint}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        jupyter = f"http://127.0.0.1:{port}"
        try:
            auth = {"Authorization": f"token {TOKEN}"}
            assert wait_until(lambda: _ok(f"{jupyter}/xdask/info", auth), 60), "jupyter server did not start"
            harness.launch(server.endpoint, {**DEFAULT_LAUNCH, "model_uid": "bench", "n_parallel": 8}, timeout=300)
            targets = {"direct": (f"{server.endpoint}/v1/chat/completions", {}),
                       "proxied": (f"{jupyter}/xdask/api/v1/chat/completions", auth)}
            rows = []
            for concurrency in (1, 8):
                _drive(*targets["direct"], "bench", concurrency, 3)  # warm-up
                runs = harness.alternate({name: (lambda u=url, h=headers, c=concurrency: _drive(u, h, "bench", c,
                                                                                                 args.seconds))
                                          for name, (url, headers) in targets.items()}, args.rounds)
                level: dict[str, Any] = {}
                for name, done in runs.items():
                    level[name] = {"tok_s": statistics.fmean(r.tok_s for r in done),
                                   "ttft_ms": statistics.fmean(_mean_ttft_ms(r) for r in done)}
                    rows.append([concurrency, name, level[name]["tok_s"], level[name]["ttft_ms"]])
                level["ratio"] = harness.ratio(level["proxied"]["tok_s"], level["direct"]["tok_s"])
                rows.append([concurrency, "proxied ÷ direct", f"{level['ratio']:.3f}", ""])
                levels[str(concurrency)] = level
            harness.print_table(["concurrency", "path", "tok/s", "mean TTFT ms"], rows)
        finally:
            lab.terminate()
            lab.wait(30)
    harness.write_result(args.result, {"stats_us_per_request": stats_us, "concurrency": levels},
                         benchmark="jupyter-proxy", packages=["jupyter_server", "xllamacpp"],
                         settings={"model": "gemma-3-270m ggufv2 Q4_K_M", "max_tokens": MAX_TOKENS,
                                   "seconds": args.seconds, "rounds": args.rounds})


if __name__ == "__main__":
    main()
