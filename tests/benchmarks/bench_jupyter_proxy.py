"""Benchmark: what the Jupyter extension's proxy and the dashboard's statistics cost.

Starts ``xdask-local`` (the default model, Gemma 3 270M Q4_K_M) and a real
``jupyter server`` whose xdask extension proxies to it, then drives streamed chat
completions (max_tokens 32) at concurrency 1 and 8, alternating rounds:

  * direct: ``{xdask}/v1/chat/completions``;
  * proxied: ``{jupyter}/xdask/api/v1/chat/completions`` (the token as API key).

It prints tokens/s, mean time to first token and the ratio proxied ÷ direct
(same processes, same run; rounds alternate so drift hits both). It also times
the per-request statistics the dashboard keeps (``RequestStats``) in-process.

    python tests/benchmarks/bench_jupyter_proxy.py [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import DEFAULT_LAUNCH, LocalServer, free_port, wait_until

MAX_TOKENS = 32
TOKEN = "bench"


async def _drive(url: str, headers: dict[str, str], uid: str, concurrency: int,
                 seconds: float) -> tuple[float, float]:
    """(completion tokens/s, mean seconds to the first content chunk) of streamed chats."""
    tokens = 0
    ttfts: list[float] = []
    stop_at = time.monotonic() + seconds
    started = time.monotonic()

    async def client(i: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(timeout=120, headers=headers) as http:
            while time.monotonic() < stop_at:
                body = {"model": uid, "messages": [{"role": "user", "content": f"Tell me story {i}."}],
                        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                first = None
                async with http.stream("POST", url, json=body) as resp:
                    assert resp.status_code == 200, await resp.aread()
                    async for line in resp.aiter_lines():
                        if first is None and '"content"' in line and '"content":""' not in line:
                            first = time.perf_counter() - t0
                        if '"usage": {' in line or '"usage":{' in line:
                            usage = json.loads(line[5:]).get("usage")
                            if usage:
                                tokens += usage["completion_tokens"]
                if first is not None:
                    ttfts.append(first)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return tokens / (time.monotonic() - started), statistics.fmean(ttfts) if ttfts else float("nan")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"dashboard statistics: {_stats_cost():.1f} us per request of 32 messages (in-process)")

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        server = LocalServer(home / "xdask")
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
            resp = httpx.post(f"{server.endpoint}/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "bench",
                                                                    "n_parallel": 8}, timeout=300)
            assert resp.status_code == 200, resp.text
            targets = {"direct": (f"{server.endpoint}/v1/chat/completions", {}),
                       "proxied": (f"{jupyter}/xdask/api/v1/chat/completions", auth)}
            print(f"{'concurrency':>11} {'path':>8} {'tok/s':>8} {'TTFT ms':>8}")
            for concurrency in (1, 8):
                results: dict[str, list[tuple[float, float]]] = {"direct": [], "proxied": []}
                asyncio.run(_drive(*targets["direct"], "bench", concurrency, 3))  # warm-up
                for _ in range(args.rounds):
                    for name, (url, headers) in targets.items():
                        results[name].append(asyncio.run(_drive(url, headers, "bench", concurrency,
                                                                args.seconds)))
                for name, rows in results.items():
                    rate = statistics.fmean(r[0] for r in rows)
                    ttft = statistics.fmean(r[1] for r in rows) * 1000
                    print(f"{concurrency:>11} {name:>8} {rate:>8.1f} {ttft:>8.1f}")
                ratio = (statistics.fmean(r[0] for r in results["proxied"])
                         / statistics.fmean(r[0] for r in results["direct"]))
                print(f"{concurrency:>11} proxied ÷ direct tokens/s: {ratio:.3f}")
        finally:
            lab.terminate()
            lab.wait(30)
            server.stop()


def _ok(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
