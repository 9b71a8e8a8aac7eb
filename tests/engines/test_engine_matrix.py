"""The engine matrix: automatic choice, reasons, ``GET /v1/engines``, ``xdask engine``.

The rule tests feed host descriptions of machines that cannot exist here
(a CUDA Linux box, a Mac) as plain data to the pure functions: that is what
``collect_host_facts`` returns on such a host. Everything about this host is
read for real, through the server.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from xdask.engines import check_engine
from xdask.engines.matrix import choose, collect_host_facts, why_not
from xdask.errors import EngineUnavailableError
from xdask.registry import resolve

ALL = {"torch": "2", "transformers": "5", "vllm": "0.32", "sglang": "0.5", "mlx_lm": "0.3", "xllamacpp": "1",
       "gguf": "0.19"}
CUDA_LINUX = {"system": "Linux", "machine": "x86_64", "cuda_gpus": 2, "packages": ALL}
CPU_LINUX = {"system": "Linux", "machine": "x86_64", "cuda_gpus": 0, "packages": ALL}
MAC = {"system": "Darwin", "machine": "arm64", "cuda_gpus": 0,
       "packages": {"torch": "2", "transformers": "5", "mlx_lm": "0.3", "xllamacpp": "1"}}
BARE = {"system": "Linux", "machine": "x86_64", "cuda_gpus": 0, "packages": {}}


@pytest.mark.parametrize(("fmt", "host", "engine"), [
    ("pytorch", CUDA_LINUX, "vllm"),
    ("awq", CUDA_LINUX, "vllm"),
    ("gptq", CUDA_LINUX, "vllm"),
    ("ggufv2", CUDA_LINUX, "llama.cpp"),
    ("ggufv2", CPU_LINUX, "llama.cpp"),
    ("pytorch", CPU_LINUX, "transformers"),  # vLLM only by default where CUDA is
    ("mlx", MAC, "mlx"),
    ("pytorch", MAC, "transformers"),
])
def test_automatic_choice_follows_the_rules(fmt, host, engine):
    assert choose(fmt, host)[0] == engine


def test_fallback_when_the_preferred_engine_is_missing():
    host = {**CUDA_LINUX, "packages": {"torch": "2", "transformers": "5"}}
    engine, passed_over = choose("pytorch", host)
    assert engine == "transformers"
    assert "vllm" in passed_over and "pip install" in passed_over["vllm"]


@pytest.mark.parametrize(("engine", "fmt", "host", "words"), [
    ("sglang", "pytorch", CPU_LINUX, "needs an NVIDIA GPU"),
    ("mlx", "ggufv2", MAC, "does not load the ggufv2 format"),
    ("vllm", "pytorch", MAC, "does not run on Darwin"),
    ("transformers", "pytorch", BARE, "pip install 'xdask[transformers]'"),
    ("llama.cpp", "ggufv2", BARE, "xllamacpp or llama_cpp"),
    ("transformers", "gptq", CPU_LINUX, "gptqmodel"),
])
def test_reasons_say_why_and_what_to_do(engine, fmt, host, words):
    assert words in why_not(engine, fmt, host)


def test_check_engine_errors_name_the_working_combinations():
    resolved = resolve("qwen2.5-instruct", "pytorch", "0_5", None)
    with pytest.raises(EngineUnavailableError) as err:
        check_engine(resolved, "llama.cpp", [CPU_LINUX])
    assert "does not load the pytorch format" in err.value.message
    assert "mlx + mlx" in err.value.message and "transformers + pytorch" in err.value.message
    with pytest.raises(EngineUnavailableError, match="Unknown engine"):
        check_engine(resolved, "tensorrt", [CPU_LINUX])
    assert check_engine(resolved, "VLLM", [CUDA_LINUX]) == "vllm"  # aliases and case forgiven


def test_this_host_is_described_for_real():
    facts = collect_host_facts()
    assert facts["system"] == "Linux" and facts["cuda_gpus"] == 0
    assert "xllamacpp" in facts["packages"]


def test_engines_endpoint(http):
    matrix = http.get("/v1/engines/gemma-3-270m").json()
    assert matrix["llama.cpp"][0]["available"] is True
    assert matrix["llama.cpp"][0]["quantizations"] == ["Q4_K_M"]
    qwen = http.get("/v1/engines/qwen2.5-instruct").json()
    sglang = qwen["sglang"]
    assert all(row["available"] is False and "NVIDIA GPU" in row["reason"] for row in sglang)
    mlx_rows = {row["model_format"] for row in qwen.get("mlx", [])}
    assert mlx_rows == {"mlx", "pytorch"}
    resp = http.get("/v1/engines/no-such-model")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_registered"


def test_launch_without_engine_picks_and_says_which(http, default_model):
    """gemma-3-270m is GGUF: llama.cpp is chosen (the default model was launched with it named)."""
    resp = http.post("/v1/models", json={"model_name": "gemma-3-270m", "model_uid": "auto-engine"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_engine"] == "llama.cpp"
    assert http.get("/v1/models/auto-engine").json()["model_engine"] == "llama.cpp"
    http.delete("/v1/models/auto-engine")


def test_launch_on_an_engine_that_cannot_run_here(http):
    resp = http.post("/v1/models", json={"model_name": "gemma-3-270m", "model_engine": "sglang"})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "sglang does not load the ggufv2 format" in message and "llama.cpp + ggufv2" in message
    # A platform this host lacks: SGLang needs CUDA (and is not installed here either).
    resp = http.post("/v1/models", json={"model_name": "qwen2.5-instruct", "model_engine": "sglang",
                                         "model_format": "pytorch", "model_size_in_billions": "0_5"})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "sglang needs an NVIDIA GPU" in message and "transformers + pytorch" in message
    resp = http.post("/v1/models", json={"model_name": "gemma-3-270m", "model_engine": "llama.cpp", "n_ctx_typo": 5})
    assert resp.status_code == 400 and "n_ctx_typo" in resp.json()["error"]["message"]


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xdask.cli", *args, "-e", server.endpoint],
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_engine_and_passthrough_options(server, http):
    out = _cli(server, "engine", "-n", "qwen2.5-instruct", "--all")
    assert out.returncode == 0, out.stderr
    assert "transformers" in out.stdout and "NVIDIA GPU" in out.stdout
    out = _cli(server, "engine", "-n", "gemma-3-270m", "-en", "sglang")
    assert out.returncode == 1 and "--all shows why" in out.stderr
    out = _cli(server, "launch", "-n", "gemma-3-270m", "-u", "cli-opts", "--n_parallel", "2", "--n_ctx", "1024")
    assert out.returncode == 0, out.stderr
    assert "engine: llama.cpp (chosen automatically)" in out.stdout
    engine = http.get("/v1/models/cli-opts").json()["engine"]
    assert engine["n_parallel"] == 2 and engine["n_ctx"] == 1024
    http.delete("/v1/models/cli-opts")
    out = _cli(server, "launch", "-n", "gemma-3-270m", "-u", "cli-bad", "--no_such_thing", "1")
    assert out.returncode != 0 and "no_such_thing" in (out.stderr + out.stdout)
