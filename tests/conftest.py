"""Fixtures that start real processes: ``xdask-local`` and a Dask client to its scheduler.

The server is one session-wide subprocess (starting it and loading the model
takes seconds); tests that terminate models launch their own uids. The helpers
(``LocalServer``, ``DEFAULT_LAUNCH``, ``free_port``, ``wait_until``, ``engine_required``)
live in ``support.servers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer


@pytest.fixture(scope="session")
def xdask_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdask-home")


@pytest.fixture(scope="session")
def server(xdask_home: Path) -> Iterator[LocalServer]:
    srv = LocalServer(xdask_home)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def http(server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.endpoint, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def default_model(http: httpx.Client) -> str:
    """The default model under uid ``gemma``, launched once for the session."""
    resp = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "gemma"})
    assert resp.status_code == 200, resp.text
    return resp.json()["model_uid"]


@pytest.fixture(scope="session")
def dask_client(server: LocalServer) -> Iterator[object]:
    """A second, independent Dask client to the server's scheduler (to look inside workers)."""
    from distributed import Client

    assert server.scheduler_address
    client = Client(server.scheduler_address, timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="session")
def oai(server: LocalServer):
    """The official ``openai`` client against the server."""
    import openai

    with openai.OpenAI(base_url=f"{server.endpoint}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2 model (HF safetensors + tokenizer + ChatML), built offline once."""
    pytest.importorskip("transformers", reason="building the tiny model needs transformers and torch")
    from support.tiny_models import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))
