"""Custom model families: register/unregister through the registry, HTTP, the CLI and both Python clients.

The first tests call ``xdask.registry.custom`` in-process against a temporary
``XDASK_HOME``; the rest run real servers: the session's ``xdask-local`` for
the APIs and launches, and two ``xdask-local`` processes one after the other
on one home for persistence across a restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask.config
import httpx
import pytest
from support.servers import LocalServer

from xdask.client import Client
from xdask.errors import ConflictError, InvalidRequestError, NotFoundError
from xdask.registry import custom, get_family, list_families, resolve


def llm_spec(name: str, **spec_fields) -> dict:
    """A small custom LLM family in our schema; ``spec_fields`` replace the spec's file location."""
    spec = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
            **(spec_fields or {"sources": [{"hub": "huggingface", "model_id": "my-org/my-model"}]})}
    return {"model_name": name, "model_ability": ["chat"], "context_length": 2048, "model_specs": [spec]}


@pytest.fixture
def home(tmp_path):
    with dask.config.set({"xdask.home": str(tmp_path)}):
        yield tmp_path
    custom._EPHEMERAL.clear()


# -- in-process --------------------------------------------------------------------------


def test_persisted_family_is_one_file_read_at_lookup(home):
    fam = custom.register("LLM", json.dumps(llm_spec("my-llm")), persist=True)
    assert fam.is_builtin is False
    path = home / "registrations" / "LLM" / "my-llm.json"
    assert json.loads(path.read_text())["model_name"] == "my-llm"
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind
    custom._EPHEMERAL.clear()  # as in a new process: only the file is left
    assert get_family("my-llm").is_builtin is False
    assert [f.model_name for f in list_families("llm") if not f.is_builtin] == ["my-llm"]
    assert resolve("my-llm").spec.sources[0].model_id == "my-org/my-model"
    custom.unregister("LLM", "my-llm")
    assert not path.exists()
    with pytest.raises(InvalidRequestError, match="not registered"):
        get_family("my-llm")


def test_unpersisted_family_lives_in_this_process_only(home):
    custom.register("LLM", llm_spec("in-memory"))
    assert not (home / "registrations" / "LLM").exists()
    assert get_family("in-memory").model_name == "in-memory"
    custom._EPHEMERAL.clear()
    assert "in-memory" not in {f.model_name for f in list_families("LLM")}


def test_names_are_checked_across_builtins_and_types(home):
    with pytest.raises(ConflictError, match="built-in LLM model") as err:
        custom.register("LLM", llm_spec("gemma-3-270m"))
    assert err.value.status == 409
    with pytest.raises(ConflictError, match="built-in embedding"):
        custom.register("LLM", llm_spec("bge-m3"))
    custom.register("LLM", llm_spec("taken"), persist=True)
    with pytest.raises(ConflictError, match="already registered"):
        custom.register("LLM", llm_spec("taken"))
    embedding = {"model_name": "taken", "dimensions": 8, "max_tokens": 16, "language": ["en"],
                 "model_specs": [{"model_format": "pytorch", "quantizations": ["none"], "model_uri": "/m"}]}
    with pytest.raises(ConflictError):
        custom.register("embedding", embedding)
    with pytest.raises(NotFoundError):
        custom.unregister("LLM", "never-registered")
    with pytest.raises(NotFoundError):
        custom.unregister("LLM", "../../etc/passwd")
    with pytest.raises(InvalidRequestError, match="built-in"):
        custom.unregister("LLM", "qwen3")


@pytest.mark.parametrize(("model", "words"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (llm_spec("x", sources=[{"hub": "huggingface", "model_id": "no-slash"}]), "Org/Name"),
    ({**llm_spec("x"), "model_ability": ["chat", "dance"]}, "dance"),
    ({k: v for k, v in llm_spec("x").items() if k != "model_specs"}, "model_specs: Field required"),
    ({**llm_spec("x"), "model_type": "embedding"}, "model_type"),
    (llm_spec("bad/name"), "model_name"),
])
def test_invalid_specs_are_400s_with_pydantic_messages(home, model, words):
    with pytest.raises(InvalidRequestError, match=words.replace("(", r"\(")) as err:
        custom.register("LLM", model)
    assert err.value.status == 400


def test_xinference_custom_model_files_are_accepted(home, tmp_path):
    """Xinference's shapes: ``model_uri`` on a spec, ``model_id``/``model_hub``, and ``model_src``."""
    xinf = {"version": 2, "context_length": 4096, "model_name": "custom-llama", "model_lang": ["en"],
            "model_ability": ["generate", "chat"], "model_family": "llama-3.1-instruct",
            "model_specs": [
                {"model_format": "pytorch", "model_size_in_billions": 8, "quantizations": ["none"],
                 "model_uri": f"file://{tmp_path}/llama"},
                {"model_format": "pytorch", "model_size_in_billions": 70, "quantizations": ["none"],
                 "model_id": "meta-llama/Llama-3.1-70B-Instruct", "model_hub": "huggingface"},
                {"model_format": "ggufv2", "model_size_in_billions": 8, "model_src": {
                    "huggingface": {"model_id": "org/Llama-GGUF", "quantizations": ["Q4_K_M", "Q8_0"],
                                    "model_file_name_template": "llama-{quantization}.gguf"},
                    "modelscope": {"model_id": "org/Llama-GGUF", "quantizations": ["Q4_K_M", "Q8_0"]}}},
            ]}
    fam = custom.register("LLM", json.dumps(xinf))
    local, hub, gguf = fam.model_specs
    assert local.model_uri == f"{tmp_path}/llama" and not local.sources
    assert resolve("custom-llama", model_size_in_billions=8).local_path() == tmp_path / "llama"
    assert [(s.hub, s.model_id) for s in hub.sources] == [("huggingface", "meta-llama/Llama-3.1-70B-Instruct")]
    assert gguf.file_name("Q8_0") == "llama-Q8_0.gguf" and {s.hub for s in gguf.sources} == {"huggingface",
                                                                                           "modelscope"}


# -- against the session's server --------------------------------------------------------


def _cli(server: LocalServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xdask.cli", *args, "-e", server.endpoint],
                          capture_output=True, text=True, timeout=120, check=False)


def _custom_names(http: httpx.Client, model_type: str = "LLM") -> set[str]:
    items = http.get(f"/v1/model_registrations/{model_type}").json()
    return {i["model_name"] for i in items if not i["is_builtin"]}


def test_register_over_http(http, xdask_home):
    body = {"model": json.dumps(llm_spec("http-llm")), "persist": True}
    resp = http.post("/v1/model_registrations/LLM", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"model_name": "http-llm", "model_type": "LLM", "persist": True, "is_builtin": False}
    assert (xdask_home / "registrations" / "LLM" / "http-llm.json").is_file()
    assert "http-llm" in _custom_names(http)
    detail = http.get("/v1/model_registrations/LLM/http-llm").json()
    assert detail["is_builtin"] is False and detail["model_specs"][0]["sources"][0]["model_id"] == "my-org/my-model"

    again = http.post("/v1/model_registrations/LLM", json=body)
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"
    bad = http.post("/v1/model_registrations/LLM", json={"model": json.dumps(llm_spec("x", sources=[
        {"hub": "huggingface", "model_id": "nope"}]))})
    assert bad.status_code == 400 and "Org/Name" in bad.json()["error"]["message"]
    assert http.post("/v1/model_registrations/LLM", json={"persist": True}).status_code == 400
    assert http.post("/v1/model_registrations/video", json=body).status_code == 400

    assert http.delete("/v1/model_registrations/LLM/http-llm").json()["deleted"] is True
    assert not (xdask_home / "registrations" / "LLM" / "http-llm.json").exists()
    missing = http.delete("/v1/model_registrations/LLM/http-llm")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_every_type_is_listed(http):
    for model_type, name in [("embedding", "all-MiniLM-L6-v2"), ("rerank", "bge-reranker-base"),
                             ("image", "sd-turbo"), ("audio", "whisper-tiny")]:
        items = http.get(f"/v1/model_registrations/{model_type}", params={"detailed": "true"}).json()
        assert name in {i["model_name"] for i in items}
        assert all(i["model_type"] == model_type for i in items)
    # Launches of every type resolve; an engine that does not serve the type says which ones do.
    resp = http.post(
        "/v1/models", json={"model_name": "bge-m3", "model_type": "embedding", "model_engine": "llama.cpp"}
    )
    assert resp.status_code == 400 and "does not serve embedding models" in resp.json()["error"]["message"]
    assert "sentence_transformers" in resp.json()["error"]["message"]


def test_register_with_the_cli(server, http, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(llm_spec("cli-llm")))
    done = _cli(server, "register", "--model-type", "LLM", "--file", str(spec_file), "--persist")
    assert done.returncode == 0, done.stderr
    assert "Registered LLM model cli-llm (persisted)" in done.stdout
    assert "cli-llm" in _custom_names(http)
    listed = _cli(server, "registrations", "-t", "LLM")
    assert "cli-llm" in listed.stdout and "False" in listed.stdout
    again = _cli(server, "register", "-t", "LLM", "--file", str(spec_file))
    assert again.returncode != 0 and "already registered" in again.stderr
    done = _cli(server, "unregister", "-t", "LLM", "-n", "cli-llm")
    assert done.returncode == 0 and "cli-llm" not in _custom_names(http)
    gone = _cli(server, "unregister", "--model-type", "LLM", "--model-name", "cli-llm")
    assert gone.returncode != 0 and "No custom LLM model" in gone.stderr


def test_register_with_the_python_client(server, http):
    with Client(server.endpoint) as client:
        client.register_model("LLM", llm_spec("py-llm"))  # a dict is fine too
        names = {r["model_name"] for r in client.list_model_registrations("LLM") if not r["is_builtin"]}
        assert "py-llm" in names
        with pytest.raises(ConflictError):
            client.register_model("LLM", json.dumps(llm_spec("py-llm")))
        client.unregister_model("LLM", "py-llm")
        with pytest.raises(NotFoundError):
            client.unregister_model("LLM", "py-llm")


def _gemma_clone(name: str) -> dict:
    """A custom GGUF family with the built-in Gemma's files (its PyPI package), template and stop words."""
    gemma = get_family("gemma-3-270m")
    spec = gemma.model_specs[0].model_dump(exclude_none=True)
    spec["sources"] = [s for s in spec["sources"] if s["hub"] == "pypi"]
    return {"model_name": name, "model_ability": ["chat", "generate"], "context_length": 4096,
            "model_specs": [spec], "chat_template": gemma.chat_template, "stop": gemma.stop}


@pytest.mark.slow
def test_launch_and_chat_with_a_custom_gguf_family(http):
    assert (
        http.post("/v1/model_registrations/LLM", json={"model": json.dumps(_gemma_clone("my-gemma"))}).status_code
        == 200
    )
    try:
        resp = http.post("/v1/models", json={"model_name": "my-gemma", "model_engine": "llama.cpp", "n_gpu": None})
        assert resp.status_code == 200, resp.text
        uid = resp.json()["model_uid"]
        reply = http.post("/v1/chat/completions", json={
            "model": uid, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        assert http.get(f"/v1/models/{uid}").json()["model_name"] == "my-gemma"
        http.delete(f"/v1/models/{uid}")
    finally:
        http.delete("/v1/model_registrations/LLM/my-gemma")


@pytest.mark.slow
def test_launch_and_chat_with_a_custom_family_at_a_local_path(http, tiny_qwen2: Path):
    """Xinference's ``model_uri``: the family points at a folder on the worker (here: the tiny Qwen2)."""
    spec = {"model_name": "my-tiny-qwen", "model_ability": ["chat"], "context_length": 256,
            "model_specs": [{"model_format": "pytorch", "model_size_in_billions": "0_001", "quantizations": ["none"],
                             "model_uri": f"file://{tiny_qwen2}"}]}
    assert http.post("/v1/model_registrations/LLM", json={"model": json.dumps(spec)}).status_code == 200
    try:
        resp = http.post("/v1/models", json={"model_name": "my-tiny-qwen", "model_engine": "transformers",
                                             "n_gpu": None})
        assert resp.status_code == 200, resp.text
        uid = resp.json()["model_uid"]
        reply = http.post("/v1/chat/completions", json={
            "model": uid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
        http.delete(f"/v1/models/{uid}")
    finally:
        http.delete("/v1/model_registrations/LLM/my-tiny-qwen")


# -- persistence across a restart ------------------------------------------------------


@pytest.mark.slow
def test_persisted_registrations_survive_a_restart(tmp_path):
    home = tmp_path / "home"
    first = LocalServer(home)
    try:
        with Client(first.endpoint) as client:
            client.register_model("LLM", llm_spec("kept"), persist=True)
            client.register_model("LLM", llm_spec("forgotten"), persist=False)
            names = {r["model_name"] for r in client.list_model_registrations("LLM") if not r["is_builtin"]}
            assert names == {"kept", "forgotten"}
    finally:
        assert first.stop() == 0
    assert sorted(p.name for p in (home / "registrations" / "LLM").iterdir()) == ["kept.json"]

    second = LocalServer(home)
    try:
        with Client(second.endpoint) as client:
            custom_ = [r for r in client.list_model_registrations("LLM", detailed=True) if not r["is_builtin"]]
            assert [r["model_name"] for r in custom_] == ["kept"]
            assert custom_[0]["model_specs"][0]["sources"][0]["model_id"] == "my-org/my-model"
            client.unregister_model("LLM", "kept")
            assert not (home / "registrations" / "LLM" / "kept.json").exists()
            assert all(r["is_builtin"] for r in client.list_model_registrations("LLM"))
    finally:
        second.stop()
