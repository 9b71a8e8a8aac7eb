"""Malformed and hostile requests: each gets an OpenAI-style error with the right 4xx.

After all of them the server and the model still answer a good request.
"""

from __future__ import annotations

import json
import socket

import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma"  # the session's default_model uid
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def chat(**changes):
    body = {**GOOD_CHAT, **changes}
    return {k: v for k, v in body.items() if v is not ...}


CASES = [
    # (name, method, path, body: dict | bytes | None, status)
    ("bad json", "POST", "/v1/chat/completions", b"{bad", 400),
    ("json array", "POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("empty body", "POST", "/v1/chat/completions", b"", 400),
    ("non-utf8 bytes", "POST", "/v1/chat/completions", b'{"model": "\xff\xfe", "messages": []}', 400),
    ("nan temperature", "POST", "/v1/chat/completions",
     b'{"model": "gemma", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
    ("deeply nested", "POST", "/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400),
    ("missing messages", "POST", "/v1/chat/completions", chat(messages=...), 400),
    ("empty messages", "POST", "/v1/chat/completions", chat(messages=[]), 400),
    ("missing model", "POST", "/v1/chat/completions", chat(model=...), 400),
    ("wrong role", "POST", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("roles not alternating", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400),
    ("content wrong type", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 42}]), 400),
    ("negative max_tokens", "POST", "/v1/chat/completions", chat(max_tokens=-5), 400),
    ("zero max_tokens", "POST", "/v1/chat/completions", chat(max_tokens=0), 400),
    ("huge max_tokens", "POST", "/v1/chat/completions", chat(max_tokens=10**12), 400),
    ("max_tokens as string", "POST", "/v1/chat/completions", chat(max_tokens="10"), 400),
    ("stream as string", "POST", "/v1/chat/completions", chat(stream="yes"), 400),
    ("temperature too high", "POST", "/v1/chat/completions", chat(temperature=5), 400),
    ("top_p zero", "POST", "/v1/chat/completions", chat(top_p=0), 400),
    ("n=2", "POST", "/v1/chat/completions", chat(n=2), 400),
    ("too many stops", "POST", "/v1/chat/completions", chat(stop=["x"] * 100), 400),
    ("unknown model", "POST", "/v1/chat/completions", chat(model="nope"), 404),
    ("prompt over the context", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "word " * 6000, "max_tokens": 4}, 400),
    ("token-id prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400),
    ("echo unsupported", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400),
    ("launch without name", "POST", "/v1/models", {"model_engine": "llama.cpp"}, 400),
    ("launch bad replica", "POST", "/v1/models", {"model_name": "gemma-3-270m", "replica": 0}, 400),
    ("method not allowed", "PUT", "/v1/chat/completions", GOOD_CHAT, 405),
    ("get on a post route", "GET", "/v1/completions", None, 405),
    ("unknown route", "POST", "/v1/nothing-here", GOOD_CHAT, 404),
    ("delete unknown model", "DELETE", "/v1/models/nope", None, 404),
]


@pytest.mark.parametrize("name,method,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(http, default_model, name, method, path, body, status):
    if isinstance(body, dict):
        resp = http.request(method, path, content=json.dumps(body).encode(),
                            headers={"Content-Type": "application/json"})
    else:
        resp = http.request(method, path, content=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]


def test_oversized_body_is_413(http, default_model):
    body = json.dumps({**GOOD_CHAT, "messages": [{"role": "user", "content": "x" * (9 * 2**20)}]})
    resp = http.post("/v1/chat/completions", content=body.encode())
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_absurd_content_length_is_refused_unread(server, default_model):
    """A client that announces a terabyte gets 413 at once; nothing is buffered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{}")
        head = sock.recv(65536).decode("latin-1")
    assert head.split()[1] == "413", head
    assert '"invalid_request_error"' in head


def test_server_still_answers_after_bad_input(http, default_model):
    for _name, method, path, body, _status in CASES:
        content = json.dumps(body).encode() if isinstance(body, dict) else body
        http.request(method, path, content=content)
    resp = http.post("/v1/chat/completions", json={**GOOD_CHAT, "max_tokens": 8})
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"]
    assert http.get("/v1/models").status_code == 200
