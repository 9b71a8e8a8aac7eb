"""Cache listing and removal: the folder contract on disk, then ``xdask-local`` over HTTP, the client and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dask.config
import httpx
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer

from xdask.errors import InvalidRequestError, NotFoundError
from xdask.hub import cache

GEMMA_VERSION = "gemma-3-270m-ggufv2-0_27b-Q4_K_M"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    with dask.config.set({"xdask.home": str(tmp_path)}):
        yield tmp_path


def _complete_folder(root: Path) -> Path:
    folder = root / "cache" / "qwen2.5-instruct-pytorch-0_5b-none"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\1" * 300_000)
    cache.mark_complete(folder, {
        "model_name": "qwen2.5-instruct", "model_format": "pytorch", "model_size_in_billions": "0_5",
        "quantization": "none", "hub": "huggingface", "model_id": "Qwen/Qwen2.5-0.5B-Instruct",
        "revision": "abc", "files": ["config.json", "model.safetensors"],
    })
    return folder


def _partial_folder(root: Path) -> Path:
    folder = root / "cache" / "gemma-3-270m-ggufv2-0_27b-Q4_K_M"
    folder.mkdir(parents=True)
    (folder / ".gemma-3-270m-q4_k_m.gguf.x1.incomplete").write_bytes(b"\0" * 100_000)
    return folder


def test_list_complete_and_partial_folders(home: Path) -> None:
    assert cache.list_cached() == []  # no cache folder yet
    done, partial = _complete_folder(home), _partial_folder(home)
    (home / "cache" / "stray-file.txt").write_text("not a model")
    listed = {e["model_version"]: e for e in cache.list_cached()}
    assert sorted(listed) == [partial.name, done.name]
    full = listed[done.name]
    assert full["complete"] is True and full["completed_at"] > 0
    assert (full["model_name"], full["model_format"], full["model_size_in_billions"], full["quantization"]) == (
        "qwen2.5-instruct", "pytorch", "0_5", "none")
    assert full["hub"] == "huggingface" and full["model_id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert full["path"] == str(done) and full["size_bytes"] >= 300_000  # du: allocated blocks
    part = listed[partial.name]
    assert part["complete"] is False and part["completed_at"] is None and part["hub"] is None
    # Without a manifest the facts come from the folder's name.
    assert (part["model_name"], part["model_format"], part["model_size_in_billions"], part["quantization"]) == (
        "gemma-3-270m", "ggufv2", "0_27", "Q4_K_M")
    assert part["size_bytes"] >= 100_000  # the partial file counts
    assert [e["model_version"] for e in cache.list_cached("gemma-3-270m")] == [partial.name]
    assert cache.list_cached("no-such-model") == []


def test_remove_is_whole_and_safe(home: Path) -> None:
    done, partial = _complete_folder(home), _partial_folder(home)
    removed = cache.remove_cached(done.name)
    assert removed[0] == str(done) and str(done / "model.safetensors") in removed
    assert not done.exists() and partial.exists()
    assert [e["model_version"] for e in cache.list_cached()] == [partial.name]
    assert not [p for p in (home / "cache").iterdir() if p.name.startswith(".removing-")]
    with pytest.raises(NotFoundError):
        cache.remove_cached(done.name)
    outside = home / "precious"
    outside.mkdir()
    for bad in ("../precious", "a/b", "..", ".", "", "x\\y", ".hidden", "cache/../../precious"):
        with pytest.raises(InvalidRequestError):
            cache.remove_cached(bad)
    assert outside.exists()


# -- a real xdask-local with its own home ------------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    srv = LocalServer(tmp_path_factory.mktemp("cache-home"), extra_env={"XDASK_LLAMA_CPP_N_PARALLEL": "2"})
    yield srv
    srv.stop()


def _cli(server: LocalServer, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "xdask.cli", *args, "--endpoint", server.endpoint],
                          capture_output=True, text=True, timeout=120, env=server.env, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_cache_over_http_cli_and_client(local: LocalServer) -> None:
    from xdask import Client
    from xdask.errors import ConflictError

    home = Path(local.env["XDASK_HOME"])
    folder = home / "cache" / GEMMA_VERSION
    with httpx.Client(base_url=local.endpoint, timeout=300) as http, Client(local.endpoint) as client:
        assert http.get("/v1/cache/models").json() == {"list": []}
        resp = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "cached-gemma"})
        assert resp.status_code == 200, resp.text
        try:
            (entry,) = http.get("/v1/cache/models").json()["list"]
            gguf = folder / "gemma-3-270m-q4_k_m.gguf"
            assert entry["model_version"] == GEMMA_VERSION and entry["path"] == str(folder)
            assert entry["model_name"] == "gemma-3-270m" and entry["model_format"] == "ggufv2"
            assert entry["size_bytes"] >= gguf.stat().st_size > 200 * 2**20
            assert entry["address"].startswith("tcp://") and entry["worker_ip"] == "127.0.0.1"
            assert isinstance(entry["complete"], bool)  # True once the downloader writes manifests
            assert http.get("/v1/cache/models", params={"model_name": "gemma-3-270m"}).json()["list"] == [entry]
            assert http.get("/v1/cache/models", params={"model_name": "other"}).json()["list"] == []
            assert client.list_cached_models() == [entry]

            table = _cli(local, "cached").stdout
            assert GEMMA_VERSION in table and "MiB" in table and entry["address"] in table
            assert json.loads(_cli(local, "cached", "--json").stdout) == [entry]

            # The server's memory estimate reads the cached GGUF's metadata (3 global + 15 windowed layers).
            est = http.get("/v1/cal_model_mem", params={"model_name": "gemma-3-270m", "context_length": 4096})
            assert est.status_code == 200, est.text
            assert est.json()["arch"]["source"] == f"gguf {gguf}" and est.json()["weights_from"] == "file size"
            assert est.json()["kv_cache_bytes"] == (3 * 4096 + 15 * 512) * 2 * 256 * 2
            assert http.get("/v1/cal_model_mem").status_code == 400

            # In use: refused, and nothing is deleted.
            busy = http.delete("/v1/cache/models", params={"model_version": GEMMA_VERSION})
            assert busy.status_code == 409, busy.text
            assert "cached-gemma/0" in busy.json()["error"]["message"]
            with pytest.raises(ConflictError):
                client.remove_cache(GEMMA_VERSION)
            refused = _cli(local, "remove-cache", "--model-version", GEMMA_VERSION, "--yes", check=False)
            assert refused.returncode != 0 and "in use" in refused.stderr and "Traceback" not in refused.stderr
            assert gguf.is_file()
        finally:
            http.delete("/v1/models/cached-gemma")

        bad = http.delete("/v1/cache/models", params={"model_version": "../cache"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model_version"
        assert http.delete("/v1/cache/models").status_code == 400
        assert http.delete("/v1/cache/models", params={"model_version": "nothing-here"}).status_code == 404

        # Without --yes the CLI asks; "n" keeps the files.
        kept = subprocess.run([sys.executable, "-m", "xdask.cli", "remove-cache", "--model-version", GEMMA_VERSION,
                               "--endpoint", local.endpoint], input="n\n", capture_output=True, text=True,
                              timeout=60, env=local.env, check=False)
        assert kept.returncode != 0 and "Aborted" in kept.stderr and folder.is_dir()

        # The JSON-body spelling of DELETE, as some clients send it.
        gone = http.request("DELETE", "/v1/cache/models", json={"model_version": GEMMA_VERSION})
        assert gone.status_code == 200, gone.text
        body = gone.json()
        assert body["result"] is True and body["removed"][0]["paths"][0] == str(folder)
        assert not folder.exists() and http.get("/v1/cache/models").json()["list"] == []

        # A second launch assembles it again; the CLI removes it this time.
        resp = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "cached-gemma-2"})
        assert resp.status_code == 200, resp.text
        http.delete("/v1/models/cached-gemma-2")
        assert [e["model_version"] for e in client.list_cached_models()] == [GEMMA_VERSION]
        out = _cli(local, "remove-cache", "--model-version", GEMMA_VERSION, "--yes").stdout
        assert f"Removed {GEMMA_VERSION}" in out and not folder.exists()
        with pytest.raises(NotFoundError):
            client.remove_cache(GEMMA_VERSION)
