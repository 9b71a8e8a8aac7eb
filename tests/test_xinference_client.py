"""Xinference's own client (``xinference-client`` on PyPI) works unchanged against xdask."""

from __future__ import annotations

import pytest
from conftest import DEFAULT_LAUNCH
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
