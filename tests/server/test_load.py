"""Load, on loopback and bounded in time: many streaming clients, then many that hang up mid-stream.

On a server of its own with the default model launched with ``request_limits``:

1. ``CLIENTS`` concurrent streaming chat clients (httpx async): every request
   ends with 200 (a complete stream, ``[DONE]``) or 429; the server process's
   RSS after the run is within 10 % of before; the model answers afterwards.
2. ``HANGUPS`` clients that disconnect after their first token: generation
   stops on the worker (the replica's ``generating`` and ``in_flight`` go
   back to 0 in ``GET /v1/models/{uid}``) and memory returns.

The figures (requests, statuses, p50/p99 latency, RSS before/after) are printed:
run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

UID = "gemma"
CLIENTS = 200
HANGUPS = 50
LIMIT = 64  # request_limits: more than HANGUPS, so every hanging-up client is admitted
MAX_TOKENS = 8
RSS_TOLERANCE = 0.10


def rss_bytes(pid: int) -> int:
    """VmRSS of process ``pid`` (``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))] if ordered else float("nan")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    home: Path = tmp_path_factory.mktemp("xdask-load")
    srv = LocalServer(home)
    with httpx.Client(base_url=srv.endpoint, timeout=300) as client:
        resp = client.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": UID, "request_limits": LIMIT})
        assert resp.status_code == 200, resp.text
    yield srv
    srv.stop()


def engine(endpoint: str) -> dict[str, Any]:
    return httpx.get(f"{endpoint}/v1/models/{UID}", timeout=60).json()["replicas"][0]["engine"]


CHAT = {"model": UID, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True}


def _text(line: str) -> str:
    """The text a chat chunk carries (the first chunk carries only the role)."""
    choices = json.loads(line[len("data: "):]).get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or ""


async def stream_once(client: httpx.AsyncClient, max_tokens: int, hang_up: bool) -> dict[str, Any]:
    """One streaming chat request: its status, latency, and whether it ended properly."""
    started = time.perf_counter()
    out: dict[str, Any] = {"status": None, "done": False, "tokens": 0}
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": max_tokens}) as resp:
        out["status"] = resp.status_code
        if resp.status_code == 200:
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: {") and _text(line):
                    out["tokens"] += 1
                    if hang_up:
                        break  # leaving the block closes the connection mid-stream
        else:
            await resp.aread()
            out["retry_after"] = resp.headers.get("Retry-After")
    out["latency"] = time.perf_counter() - started
    return out


async def wave(endpoint: str, n: int, max_tokens: int, hang_up: bool, deadline: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=endpoint, timeout=300, limits=limits) as client:
        tasks = [asyncio.create_task(stream_once(client, max_tokens, hang_up)) for _ in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} of {n} requests did not end within {deadline} s"
        return [t.result() for t in done]


def report(name: str, results: list[dict[str, Any]], before: int, after: int, seconds: float) -> None:
    statuses: dict[int, int] = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    ok = [r["latency"] for r in results if r["status"] == 200]
    refused = [r["latency"] for r in results if r["status"] == 429]
    print(f"\n[load] {name}: {len(results)} requests in {seconds:.1f} s; statuses {dict(sorted(statuses.items()))}")
    if ok:
        print(f"[load]   200 latency p50 {percentile(ok, 0.5) * 1000:.0f} ms, p99 {percentile(ok, 0.99) * 1000:.0f} ms")
    if refused:
        print(f"[load]   429 latency p50 {percentile(refused, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(refused, 0.99) * 1000:.0f} ms")
    print(f"[load]   server RSS before {before / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB "
          f"({(after - before) / before * 100:+.1f} %)")


def settled_rss(pid: int) -> int:
    """RSS once the server is idle again (a moment for buffers and the sampler to settle)."""
    gc.collect()  # this process's own garbage, so it does not compete
    time.sleep(3)
    return rss_bytes(pid)


def test_many_streaming_clients(server: LocalServer) -> None:
    pid = server.proc.pid
    # Warm up the same paths (streams and 429s) so one-off allocations are not counted as growth.
    warm = asyncio.run(wave(server.endpoint, 100, MAX_TOKENS, hang_up=False, deadline=300))
    assert {r["status"] for r in warm} <= {200, 429}
    before = settled_rss(pid)
    started = time.monotonic()
    results = asyncio.run(wave(server.endpoint, CLIENTS, MAX_TOKENS, hang_up=False, deadline=600))
    seconds = time.monotonic() - started
    after = settled_rss(pid)
    report(f"{CLIENTS} streaming clients, request_limits={LIMIT}", results, before, after, seconds)
    assert len(results) == CLIENTS
    assert all(r["status"] in (200, 429) for r in results), {r["status"] for r in results}
    assert all(r["done"] for r in results if r["status"] == 200), "a 200 stream ended without [DONE]"
    assert all(r["retry_after"] for r in results if r["status"] == 429)
    assert sum(r["status"] == 200 for r in results) >= LIMIT // 2
    assert after <= before * (1 + RSS_TOLERANCE), (before, after)
    assert wait_until(lambda: engine(server.endpoint)["in_flight"] == 0, timeout=60)
    ok = httpx.post(f"{server.endpoint}/v1/chat/completions", timeout=120,
                    json={**CHAT, "stream": False, "max_tokens": 4})
    assert ok.status_code == 200, ok.text


def test_clients_that_hang_up_stop_generation(server: LocalServer) -> None:
    pid = server.proc.pid
    asyncio.run(wave(server.endpoint, 10, 1000, hang_up=True, deadline=300))  # warm-up of this path
    assert wait_until(lambda: engine(server.endpoint)["generating"] == 0, timeout=60)
    before = settled_rss(pid)
    started = time.monotonic()
    results = asyncio.run(wave(server.endpoint, HANGUPS, 1000, hang_up=True, deadline=600))
    hung_up = time.monotonic()

    def stopped() -> bool:
        facts = engine(server.endpoint)
        return facts["generating"] == 0 and facts["in_flight"] == 0

    # 1000 tokens each would take minutes here; cancelled, every job ends at its next token.
    assert wait_until(stopped, timeout=60, interval=0.2), engine(server.endpoint)
    stop_seconds = time.monotonic() - hung_up
    after = settled_rss(pid)
    report(f"{HANGUPS} clients hanging up after their first token", results, before, after,
           hung_up - started)
    print(f"[load]   the worker stopped generating {stop_seconds:.1f} s after the last client hung up")
    assert all(r["status"] == 200 and r["tokens"] >= 1 and not r["done"] for r in results), results[:3]
    assert after <= before * (1 + RSS_TOLERANCE), (before, after)
    ok = httpx.post(f"{server.endpoint}/v1/chat/completions", timeout=120,
                    json={**CHAT, "stream": False, "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    metrics = httpx.get(f"{server.endpoint}/metrics", timeout=60).text
    assert f'xdask_requests_total{{model="{UID}",outcome="cancelled"}}' in metrics
