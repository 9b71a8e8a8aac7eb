"""Both llama.cpp backends, in-process and behind the server, on the real Gemma GGUF.

CI sets XDASK_TEST_REQUIRE_BACKENDS=1 so that a backend missing there fails
instead of skipping.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os

import pytest

from xdask.engines.base import Delta, SamplingParams
from xdask.engines.llama_cpp import choose_backend, make_engine
from xdask.engines.llama_cpp.options import LlamaCppOptions
from xdask.errors import EngineUnavailableError
from xdask.hub import locate_model
from xdask.registry import resolve

from conftest import DEFAULT_LAUNCH

pytestmark = pytest.mark.slow

MODULES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}


def require(backend: str) -> None:
    if importlib.util.find_spec(MODULES[backend]) is None:
        if os.environ.get("XDASK_TEST_REQUIRE_BACKENDS") == "1":
            pytest.fail(f"{backend} is not installed but CI requires it")
        pytest.skip(f"{backend} is not installed")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> str:
    import dask.config

    with dask.config.set({"xdask.home": str(tmp_path_factory.mktemp("home"))}):
        return str(locate_model(resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")))


@pytest.fixture(scope="module", params=["xllamacpp", "llama-cpp-python"])
def engine(request, gguf_path):
    require(request.param)
    options = LlamaCppOptions(n_ctx=4096, n_parallel=4 if request.param == "xllamacpp" else 1,
                              n_threads=2, n_gpu_layers=0)
    eng = make_engine(gguf_path, request.param, {"options": options})
    eng.load()
    yield eng
    eng.close()


def run(engine, prompt: str, **params) -> tuple[str, Delta]:
    pieces: list[Delta] = []
    engine.generate(prompt, SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **params}),
                    lambda d: pieces.append(d) or False)
    last = next(d for d in reversed(pieces) if d.finish_reason)
    return "".join(d.text for d in pieces), last


def test_generates_with_usage(engine):
    text, last = run(engine, "1, 2, 3, 4, 5,", max_tokens=6)
    assert text.startswith(" 6")
    assert last.finish_reason == "length"
    assert last.completion_tokens == 6 and last.prompt_tokens >= 10


def test_stop_sequence(engine):
    text, last = run(engine, "1, 2, 3, 4, 5,", max_tokens=16, stop=[","])
    assert text.strip() == "6" and last.finish_reason == "stop"


def test_emit_returning_true_stops_generation(engine):
    seen: list[Delta] = []

    def emit(delta: Delta) -> bool:
        seen.append(delta)
        return len(seen) >= 3

    engine.generate("Once upon a time", SamplingParams(max_tokens=200, temperature=0.0), emit)
    assert 3 <= len(seen) <= 5


def test_concurrent_requests_do_not_corrupt_each_other(engine):
    prompts = [f"{n}, {n + 1}, {n + 2}, {n + 3}," for n in (10, 20, 30, 40, 50, 60)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: run(engine, p, max_tokens=4, stop=[","]), prompts))
    for n, (text, _last) in zip((10, 20, 30, 40, 50, 60), results):
        assert text.strip() == str(n + 4)


def test_backend_choice(monkeypatch):
    import dask.config

    installed = [b for b, m in MODULES.items() if importlib.util.find_spec(m)]
    if installed:
        assert choose_backend("auto") == installed[0]
    with pytest.raises(EngineUnavailableError):
        choose_backend("no-such-backend")
    with dask.config.set({"xdask.llama-cpp.backend": "llama-cpp-python"}):
        if "llama-cpp-python" in installed:
            assert choose_backend() == "llama-cpp-python"
        else:
            with pytest.raises(EngineUnavailableError):
                choose_backend()


@pytest.mark.parametrize("backend", ["xllamacpp", "llama-cpp-python"])
def test_server_serves_each_backend(http, backend):
    require(backend)
    uid = f"backend-{backend}"
    resp = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": uid, "llama_cpp_backend": backend})
    assert resp.status_code == 200, resp.text
    try:
        assert http.get(f"/v1/models/{uid}").json()["engine"]["backend"] == backend
        out = http.post("/v1/completions", json={"model": uid, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 3,
                                                 "temperature": 0}).json()
        assert out["choices"][0]["text"].startswith(" 6")
        assert out["usage"]["completion_tokens"] == 3
        chat = http.post("/v1/chat/completions", json={"model": uid, "max_tokens": 6,
                                                       "messages": [{"role": "user", "content": "Hello"}]}).json()
        assert chat["choices"][0]["message"]["content"]
    finally:
        assert http.delete(f"/v1/models/{uid}").status_code == 200
