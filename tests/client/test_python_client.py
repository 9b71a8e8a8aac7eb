"""``xdask.Client``: the Python client against the real server."""

from __future__ import annotations

import pytest
from support.servers import DEFAULT_LAUNCH

import xdask
from xdask.errors import InvalidRequestError, NotFoundError

pytestmark = pytest.mark.slow


def test_client_launch_chat_generate_terminate(server, default_model):
    with xdask.Client(server.endpoint) as client:
        uid = client.launch_model(**DEFAULT_LAUNCH, model_uid="py-client")
        assert uid == "py-client"
        assert uid in client.list_models() and default_model in client.list_models()
        model = client.get_model(uid)
        assert model.description["model_ability"] == ["generate", "chat"]

        text = model.generate("1, 2, 3, 4, 5,", max_tokens=3, temperature=0)["choices"][0]["text"]
        assert text.startswith(" 6")
        streamed = "".join(c["choices"][0]["text"] for c in model.generate("1, 2, 3, 4, 5,", max_tokens=3,
                                                                           temperature=0, stream=True))
        assert streamed == text

        reply = model.chat("Hello!", max_tokens=8)
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] > 0
        chunks = list(model.chat([{"role": "user", "content": "Hello!"}], generate_config={"max_tokens": 8,
                                                                                          "stream": True}))
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

        with pytest.raises(InvalidRequestError):
            model.chat("Hi", max_tokens=-1)
        client.terminate_model(uid)
        assert uid not in client.list_models()
        with pytest.raises(NotFoundError):
            client.get_model(uid)
