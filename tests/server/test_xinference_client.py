"""Xinference's own client (``xinference-client`` on PyPI) works unchanged against xdask."""

from __future__ import annotations

import pytest
from support.servers import DEFAULT_LAUNCH
from xinference_client import RESTfulClient

pytestmark = pytest.mark.slow


def test_xinference_client_round_trip(server, default_model):
    client = RESTfulClient(server.endpoint)
    assert default_model in client.list_models()
    names = [r["model_name"] for r in client.list_model_registrations("LLM")]
    assert "gemma-3-270m" in names

    uid = client.launch_model(
        model_name=DEFAULT_LAUNCH["model_name"], model_engine="llama.cpp", model_format="ggufv2",
        quantization="Q4_K_M", model_uid="xinf", n_gpu=None,
    )
    assert uid == "xinf"
    model = client.get_model(uid)
    assert type(model).__name__ == "RESTfulChatModelHandle"
    reply = model.chat(messages=[{"role": "user", "content": "Hello!"}], generate_config={"max_tokens": 8})
    assert reply["choices"][0]["message"]["content"]
    chunks = list(model.chat(messages=[{"role": "user", "content": "Hello!"}],
                             generate_config={"max_tokens": 8, "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    desc = client.describe_model(uid)
    assert desc["model_type"] == "LLM" and desc["model_name"] == "gemma-3-270m"
    client.terminate_model(uid)
    assert uid not in client.list_models()
    with pytest.raises(RuntimeError, match="not found"):
        client.get_model(uid)


def test_xinference_client_registers_custom_models(server):
    """Xinference's register_model sends the spec as a JSON string; unregister_model deletes it."""
    import json

    client = RESTfulClient(server.endpoint)
    spec = {"version": 2, "model_name": "xinf-custom", "model_lang": ["en"], "model_ability": ["chat"],
            "context_length": 2048, "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1,
                                                     "quantizations": ["none"], "model_id": "my-org/my-model"}]}
    client.register_model(model_type="LLM", model=json.dumps(spec), persist=False)
    found = {r["model_name"]: r for r in client.list_model_registrations("LLM")}
    assert found["xinf-custom"]["is_builtin"] is False
    with pytest.raises(RuntimeError, match="already registered"):
        client.register_model(model_type="LLM", model=json.dumps(spec), persist=False)
    client.unregister_model(model_type="LLM", model_name="xinf-custom")
    assert "xinf-custom" not in {r["model_name"] for r in client.list_model_registrations("LLM")}
