"""Limits and backpressure on a server of its own (small limits so the tests stay small).

- ``request_limits``: past N concurrent requests to a model, 429 ``rate_limit_exceeded`` with ``Retry-After``;
- a replica's bounded queue: past its slots plus ``xdask.limits.replica-queue``, 429 ``replica_queue_full``;
- the body cap: 413 on JSON routes (any method) and on the multipart upload routes;
- the request timeout: 504, and the generation stops on the worker.
"""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_BODY = 65536
UPLOAD = 100_000
FRAMING = 1 << 20  # multipart framing the upload routes allow on top of the file (xdask_server.forms)
REQUEST_TIMEOUT = 15


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    home: Path = tmp_path_factory.mktemp("xdask-limits")
    srv = LocalServer(home, extra_env={
        "XDASK_MAX_BODY_SIZE": str(MAX_BODY),
        "XDASK_AUDIO__MAX_UPLOAD_SIZE": str(UPLOAD),
        "XDASK_IMAGE__MAX_UPLOAD_SIZE": str(UPLOAD),
        "XDASK_BATCH_API__MAX_FILE_SIZE": str(UPLOAD),
        "XDASK_LIMITS__RETRY_AFTER": "2",
        "XDASK_LIMITS__REPLICA_QUEUE": "1",
        "XDASK_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
    })
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.endpoint, timeout=120) as c:
        yield c


def launch(client: httpx.Client, uid: str, **options: Any) -> None:
    resp = client.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": uid, "n_parallel": 2, **options})
    assert resp.status_code == 200, resp.text


def engine_facts(client: httpx.Client, uid: str) -> dict[str, Any]:
    return client.get(f"/v1/models/{uid}").json()["replicas"][0]["engine"]


# Greedy: the same long answer every time (a sampled one may end early at an end-of-text token).
LONG = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.0, "stream": True}


async def _hold(endpoint: str, uid: str, n: int, started: asyncio.Event, release: asyncio.Event,
                wait_first: bool = True) -> list[int]:
    """Open ``n`` long streams to ``uid``; set ``started`` once each got its first chunk (or was sent)."""
    statuses: list[int] = []
    got = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal got
        async with client.stream("POST", "/v1/completions", json={"model": uid, **LONG}) as resp:
            statuses.append(resp.status_code)
            # Keep the iterator referenced: an abandoned async generator is closed when it is collected,
            # which would close the response (and hang up) right away.
            lines = resp.aiter_lines()
            if resp.status_code == 200:
                async for line in lines:
                    if line.startswith("data:"):
                        break
            got += 1
            if got == n:
                started.set()
            await release.wait()  # leaving the block hangs up
            del lines

    async with httpx.AsyncClient(base_url=endpoint, timeout=120) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(n)]
        if not wait_first:
            started.set()
        await asyncio.gather(*tasks)
    return statuses


def test_request_limits_answer_429_with_retry_after(server: LocalServer, client: httpx.Client) -> None:
    import openai

    launch(client, "limited", request_limits=2)

    async def scenario() -> tuple[list[int], list[httpx.Response], Any]:
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(server.endpoint, "limited", 2, started, release))
        await asyncio.wait_for(started.wait(), 120)
        async with httpx.AsyncClient(base_url=server.endpoint, timeout=60) as c:
            refused = [
                await c.post("/v1/completions", json={"model": "limited", "prompt": "Hi", "max_tokens": 2}),
                await c.post("/v1/chat/completions", json={"model": "limited", "stream": True, "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "Hi"}]}),
            ]
        sdk_error = None
        try:
            with openai.OpenAI(base_url=f"{server.endpoint}/v1", api_key="x", max_retries=0) as oai:
                await asyncio.to_thread(oai.completions.create, model="limited", prompt="Hi", max_tokens=2)
        except openai.RateLimitError as exc:
            sdk_error = exc
        release.set()
        return await holder, refused, sdk_error

    held, refused, sdk_error = asyncio.run(scenario())
    assert held == [200, 200]
    for resp in refused:
        assert resp.status_code == 429, resp.text
        assert resp.headers["Retry-After"] == "2"
        error = resp.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "request_limits" in error["message"]
    assert sdk_error is not None and sdk_error.status_code == 429
    # The held streams hung up: the model admits requests again.
    assert wait_until(lambda: engine_facts(client, "limited")["generating"] == 0, timeout=30)
    ok = client.post("/v1/completions", json={"model": "limited", "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    metrics = client.get("/metrics").text
    assert 'xdask_requests_rejected_total{model="limited",reason="request_limits"} 3.0' in metrics
    assert 'xdask_model_request_limit{model="limited"} 2.0' in metrics
    assert client.delete("/v1/models/limited").status_code == 200


def test_bad_request_limits_are_400(client: httpx.Client) -> None:
    for bad in (0, -3, "many", 1.5):
        resp = client.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "bad", "request_limits": bad})
        assert resp.status_code == 400, (bad, resp.text)


def test_a_full_replica_queue_answers_429(server: LocalServer, client: httpx.Client) -> None:
    launch(client, "queued")  # 2 slots + a queue of 1 (XDASK_LIMITS__REPLICA_QUEUE)
    assert engine_facts(client, "queued")["queue_limit"] == 1

    async def scenario() -> tuple[list[int], httpx.Response, dict[str, Any]]:
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(server.endpoint, "queued", 3, started, release, wait_first=False))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while (await asyncio.to_thread(engine_facts, client, "queued"))["in_flight"] < 3:
            assert loop.time() < deadline, "the three streams never reached the replica"
            await asyncio.sleep(0.2)
        facts = await asyncio.to_thread(engine_facts, client, "queued")
        async with httpx.AsyncClient(base_url=server.endpoint, timeout=60) as c:
            refused = await c.post("/v1/completions", json={"model": "queued", "prompt": "Hi", "max_tokens": 2})
        release.set()
        return await holder, refused, facts

    held, refused, facts = asyncio.run(scenario())
    assert held == [200, 200, 200]
    assert facts["queued"] == 1 and facts["max_concurrency"] == 2
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "replica_queue_full"
    assert refused.headers["Retry-After"] == "2"
    assert wait_until(lambda: engine_facts(client, "queued")["generating"] == 0, timeout=30)
    assert wait_until(lambda: engine_facts(client, "queued")["in_flight"] == 0, timeout=30)
    assert 'reason="replica_queue"} 1.0' in client.get("/metrics").text
    ok = client.post("/v1/completions", json={"model": "queued", "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_request_timeout_is_504_and_stops_the_generation(client: httpx.Client) -> None:
    # "queued" from the test before (any running model does).
    if client.get("/v1/models/queued").status_code != 200:
        launch(client, "queued")
    resp = client.post("/v1/completions", json={"model": "queued", "prompt": "Once upon a time",
                                                "max_tokens": 1900, "temperature": 1.0}, timeout=REQUEST_TIMEOUT * 4)
    assert resp.status_code == 504, resp.text[:300]
    assert resp.json()["error"]["type"] == "timeout_error"
    assert wait_until(lambda: engine_facts(client, "queued")["generating"] == 0, timeout=30)


# -- 413 ---------------------------------------------------------------------------------

BIG_JSON = b'{"model": "x", "padding": "' + b"a" * (MAX_BODY + 10) + b'"}'


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
    ("POST", "/v1/rerank"), ("POST", "/v1/images/generations"), ("POST", "/v1/audio/speech"),
    ("POST", "/v1/models"), ("POST", "/v1/model_registrations/LLM"), ("POST", "/v1/batches"),
    ("DELETE", "/v1/cache/models"), ("GET", "/v1/models"), ("GET", "/v1/cluster/health"),
    ("POST", "/v1/models/x/cancel"), ("DELETE", "/v1/files/file-x"),
])
def test_json_routes_answer_413(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(method, path, content=BIG_JSON, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json()["error"]["type"] == "invalid_request_error"


def _wav(n_bytes: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0" * n_bytes)
    return buf.getvalue()


@pytest.mark.parametrize(("path", "field", "size"), [
    ("/v1/audio/transcriptions", "file", UPLOAD + FRAMING + 1000),
    ("/v1/audio/translations", "file", UPLOAD + FRAMING + 1000),
    ("/v1/images/edits", "image", UPLOAD + FRAMING + 1000),
    ("/v1/images/variations", "image", UPLOAD + FRAMING + 1000),
    ("/v1/files", "file", UPLOAD + 1000),
])
def test_multipart_routes_answer_413(client: httpx.Client, path: str, field: str, size: int) -> None:
    fields = {"model": "x", "purpose": "batch", "prompt": "p"}
    resp = client.post(path, data=fields, files={field: ("upload.bin", _wav(size), "application/octet-stream")})
    assert resp.status_code == 413, resp.text[:300]


def test_a_huge_content_length_is_refused_unread(server: LocalServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000000\r\n\r\n{")  # > 8 x the cap: refused on the headers
        answer = sock.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
