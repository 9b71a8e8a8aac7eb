"""The Jupyter server extension (``/xdask/`` routes) and the shared embedded xdask-local.

Real processes throughout: ``jupyter server`` subprocesses with their own
config, data and runtime folders (so the user's Jupyter config cannot leak
in), the session's ``xdask-local`` (fixture ``server``), embedded servers
started by the extension or by :mod:`xdask_jupyter.embedded`, and a small
fake upstream for what a real server cannot show on demand (a stream that
stays open, redirects, the headers that arrive).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dask.config
import httpx
import pytest
from support.jupyter_server import AUTH, TOKEN, JupyterServer, pid_gone
from support.servers import LocalServer, free_port, wait_until


@pytest.fixture
def jupyter_factory(tmp_path: Path) -> Iterator:
    """Start Jupyter servers for one test; whatever is left running is stopped afterwards."""
    started: list[JupyterServer] = []

    def start(*args: str, **kwargs) -> JupyterServer:
        srv = JupyterServer(tmp_path / f"jupyter{len(started)}", *args, **kwargs)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def proxied(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """One Jupyter server fronting the session's xdask-local, configured on the command line."""
    srv = JupyterServer(tmp_path_factory.mktemp("jupyter-proxied"), f"--XdaskExtension.endpoint={server.endpoint}")
    yield srv
    srv.stop()


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# -- installed and enabled ------------------------------------------------------------


def test_extension_is_listed_enabled_and_valid(tmp_path: Path) -> None:
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path), "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "jupyter", "server", "extension", "list"],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert re.search(r"xdask_jupyter\s+enabled", text), text
    assert re.search(r"Validating xdask_jupyter\.\.\.\s+xdask_jupyter\s*\S*\s*OK", text), text


# -- proxy to a configured endpoint (the real model) -----------------------------------


def test_info_reports_the_configured_endpoint(proxied: JupyterServer, server: LocalServer) -> None:
    info = proxied.http.get("/xdask/info").json()
    import xdask

    assert info == {"endpoint": server.endpoint, "mode": "proxy", "running": True, "embedded": False,
                    "dashboard": "/xdask/dashboard", "version": xdask.__version__}


def test_unauthenticated_requests_are_refused(proxied: JupyterServer) -> None:
    for method, path in [("GET", "/xdask/info"), ("GET", "/xdask/api/v1/models"), ("POST", "/xdask/local"),
                         ("POST", "/xdask/api/v1/chat/completions")]:
        resp = httpx.request(method, proxied.url + path, json={} if method == "POST" else None, timeout=30)
        assert resp.status_code in (401, 403), (method, path, resp.status_code)
    wrong = httpx.get(proxied.url + "/xdask/api/v1/models", headers={"Authorization": "token wrong"}, timeout=30)
    assert wrong.status_code in (401, 403)


def test_status_through_the_proxy(proxied: JupyterServer) -> None:
    resp = proxied.http.get("/xdask/api/status")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


@pytest.mark.slow
def test_models_lists_gemma(proxied: JupyterServer, default_model: str) -> None:
    resp = proxied.http.get("/xdask/api/v1/models")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert default_model in [m["id"] for m in resp.json()["data"]]


@pytest.mark.slow
def test_streamed_chat_arrives_as_sse_events(proxied: JupyterServer, default_model: str) -> None:
    body = {"model": default_model, "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 16, "temperature": 0, "stream": True}
    with proxied.http.stream("POST", "/xdask/api/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()


@pytest.mark.slow
def test_chat_and_openai_client_through_the_proxy(proxied: JupyterServer, default_model: str) -> None:
    body = {"model": default_model, "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8, "temperature": 0}
    resp = proxied.http.post("/xdask/api/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    plain = resp.json()["choices"][0]["message"]["content"]
    assert plain

    import openai

    # Jupyter accepts its token as a bearer key, so the official client works through the proxy as is.
    with openai.OpenAI(base_url=f"{proxied.url}/xdask/api/v1", api_key=TOKEN, max_retries=0) as oai:
        streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(**body, stream=True)
                           if c.choices)
        assert streamed == plain
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(**{**body, "model": "no-such-model"})


@pytest.mark.slow
def test_upstream_errors_come_through_unchanged(proxied: JupyterServer, server: LocalServer,
                                                default_model: str) -> None:
    bad = {"model": default_model, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}
    for body, status in [(bad, 400), ({**bad, "model": "no-such-model", "max_tokens": 4}, 404)]:
        direct = httpx.post(f"{server.endpoint}/v1/chat/completions", json=body, timeout=60)
        through = proxied.http.post("/xdask/api/v1/chat/completions", json=body)
        assert through.status_code == direct.status_code == status
        assert through.json() == direct.json()
        assert set(through.json()["error"]) >= {"message", "type", "param", "code"}
    missing = proxied.http.get("/xdask/api/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_endpoint_from_the_environment(jupyter_factory, server: LocalServer) -> None:
    jup = jupyter_factory(env={"XDASK_ENDPOINT": server.endpoint})
    info = jup.http.get("/xdask/info").json()
    assert info["endpoint"] == server.endpoint and info["mode"] == "proxy" and info["running"]
    assert jup.http.get("/xdask/api/v1/models").status_code == 200


def test_command_line_wins_over_the_environment(jupyter_factory, server: LocalServer) -> None:
    jup = jupyter_factory(f"--XdaskExtension.endpoint={server.endpoint}",
                          env={"XDASK_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert jup.http.get("/xdask/info").json()["endpoint"] == server.endpoint


def test_upstream_down_is_a_502_with_an_openai_error(jupyter_factory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    jup = jupyter_factory(f"--XdaskExtension.endpoint={dead}")
    assert jup.http.get("/xdask/info").json()["running"] is False
    for method in ("GET", "POST"):
        resp = jup.http.request(method, "/xdask/api/v1/models", json={} if method == "POST" else None)
        assert resp.status_code == 502
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert dead in err["message"] and err["code"] == "upstream_unreachable"
    # A fixed URL is never replaced by an embedded server.
    assert jup.http.post("/xdask/local").status_code == 409


# -- the proxy's streaming, headers and redirects, against a fake upstream ------------


class FakeUpstream:
    """A tiny HTTP server that records requests, holds an SSE stream open and redirects."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.stream_closed = threading.Event()
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _record(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                      self.rfile.read(n) if n else b""))

            def _json(self, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._record()
                port = self.server.server_address[1]
                if self.path == "/dashboard":
                    self._json(302, {}, {"Location": "dashboard/"})
                elif self.path == "/dashboard/absolute":
                    self._json(302, {}, {"Location": f"http://127.0.0.1:{port}/dashboard/?x=1"})
                elif self.path == "/dashboard/":
                    page = b"<html><body><script src='static/app.js'></script></body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                elif self.path.startswith("/sse"):
                    self._sse()
                else:
                    self._json(200, {"path": self.path})

            def do_POST(self) -> None:
                self._record()
                self._json(201, {"echo": fake.requests[-1][3].decode()})

            def do_DELETE(self) -> None:
                self._record()
                self.send_response(204)
                self.end_headers()

            def _sse(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"data: first\n\n")
                self.wfile.flush()
                # Wait, sending nothing more, until the proxy closes the connection (or the test ends).
                sock = self.connection
                while not fake.release.is_set():
                    ready, _, _ = select.select([sock], [], [], 0.05)
                    if ready and sock.recv(1, socket.MSG_PEEK) == b"":
                        fake.stream_closed.set()
                        return
                self.wfile.write(b"data: last\n\n")
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    yield fake
    fake.close()


def test_proxy_headers_methods_and_query(jupyter_factory, fake_upstream: FakeUpstream) -> None:
    jup = jupyter_factory(f"--XdaskExtension.endpoint={fake_upstream.endpoint}")
    resp = jup.http.get("/xdask/api/v1/things/a%2Fb?x=1&y=two", headers={"X-Xdask-Authorization": "Bearer sk-1"})
    assert resp.status_code == 200 and resp.json() == {"path": "/v1/things/a%2Fb?x=1&y=two"}
    _, _, headers, _ = fake_upstream.requests[-1]
    assert headers["authorization"] == "Bearer sk-1"
    assert "x-xdask-authorization" not in headers and "cookie" not in headers
    jup.http.get("/xdask/api/plain", headers={"Cookie": "c=1"})
    _, _, headers, _ = fake_upstream.requests[-1]
    assert TOKEN not in json.dumps(headers) and "authorization" not in headers and "cookie" not in headers
    resp = jup.http.post("/xdask/api/echo", content=b'{"a": 1}', headers={"Content-Type": "application/json"})
    assert resp.status_code == 201 and resp.json() == {"echo": '{"a": 1}'}
    assert fake_upstream.requests[-1][2]["content-type"] == "application/json"
    resp = jup.http.delete("/xdask/api/v1/models/x")
    assert resp.status_code == 204 and resp.content == b""


def test_sse_is_relayed_as_it_arrives_and_disconnect_closes_upstream(jupyter_factory,
                                                                     fake_upstream: FakeUpstream) -> None:
    jup = jupyter_factory(f"--XdaskExtension.endpoint={fake_upstream.endpoint}")
    with httpx.Client(base_url=jup.url, headers=AUTH, timeout=30) as client, \
            client.stream("GET", "/xdask/api/sse") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        # The upstream holds the stream open after its first event: it must arrive anyway.
        first = next(line for line in resp.iter_lines() if line)
        assert first == "data: first"
    # The client left; the proxy must close its upstream request too.
    assert fake_upstream.stream_closed.wait(10), jup.log()


def test_dashboard_redirects_and_pages(jupyter_factory, fake_upstream: FakeUpstream) -> None:
    jup = jupyter_factory(f"--XdaskExtension.endpoint={fake_upstream.endpoint}")
    resp = jup.http.get("/xdask/dashboard", follow_redirects=False)
    assert resp.status_code == 302 and resp.headers["location"] == "dashboard/"
    resp = jup.http.get("/xdask/dashboard/absolute", follow_redirects=False)
    assert resp.status_code == 302 and resp.headers["location"] == "/xdask/dashboard/?x=1"
    resp = jup.http.get("/xdask/dashboard", follow_redirects=True)
    assert resp.status_code == 200 and resp.url.path == "/xdask/dashboard/"
    assert resp.headers["content-type"].startswith("text/html") and b"static/app.js" in resp.content
    data = jup.http.get("/xdask/dashboard/data/models?since=3")
    assert data.json() == {"path": "/dashboard/data/models?since=3"}
    # A browser without the token is sent to Jupyter's login, not to the dashboard.
    anon = httpx.get(jup.url + "/xdask/dashboard/", follow_redirects=False, timeout=30)
    assert anon.status_code in (302, 401, 403) and "dashboard/data" not in anon.text


# -- the embedded xdask-local ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_local_mode_starts_on_demand_and_stops_with_jupyter(jupyter_factory, tmp_path: Path, sig: int) -> None:
    home = tmp_path / "home"
    jup = jupyter_factory("--XdaskExtension.endpoint=local", xdask_home=home)
    info = jup.http.get("/xdask/info").json()
    assert info["mode"] == "local" and info["running"] is False and info["endpoint"] is None
    assert not (home / "run" / "local.json").exists()
    if sig == signal.SIGTERM:
        started = jup.http.post("/xdask/local")
        assert started.status_code == 200, started.text
        endpoint = started.json()["endpoint"]
    else:
        # No explicit start: the first proxied request starts it.
        endpoint = None
    status = jup.http.get("/xdask/api/status")
    assert status.status_code == 200 and status.json()["status"] == "ok"
    state = json.loads((home / "run" / "local.json").read_text())
    assert state["owner_pid"] == jup.proc.pid and state["endpoint"] == (endpoint or state["endpoint"])
    assert httpx.get(state["endpoint"] + "/status", timeout=10).status_code == 200
    info = jup.http.get("/xdask/info").json()
    assert info["running"] is True and info["endpoint"] == state["endpoint"] and info["embedded"] is True
    assert jup.http.post("/xdask/local").json()["endpoint"] == state["endpoint"]  # reused, not a second one

    jup.stop(sig)
    assert wait_until(lambda: pid_gone(state["pid"]), timeout=30), f"embedded server still runs\n{jup.log()}"
    assert not (home / "run" / "local.json").exists()


def test_local_start_failure_is_a_503(jupyter_factory, tmp_path: Path) -> None:
    jup = jupyter_factory("--XdaskExtension.endpoint=local", xdask_home=tmp_path / "home",
                          env={"XDASK_JUPYTER__LOCAL_START_TIMEOUT": "0.01"})
    resp = jup.http.get("/xdask/api/v1/models")
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["type"] == "service_unavailable" and err["code"] == "embedded_server_failed"
    assert "local-start-timeout" in err["message"]
    assert jup.http.post("/xdask/local").status_code == 503


def test_ensure_local_is_shared_across_processes(tmp_path: Path) -> None:
    from xdask_jupyter import embedded

    home = tmp_path / "home"
    env = {**os.environ, "XDASK_HOME": str(home)}
    probe = "from xdask_jupyter.embedded import {0}; print({0}())"
    with dask.config.set({"xdask.home": str(home)}):
        assert embedded.local_endpoint() is None
        t0 = time.monotonic()
        endpoint = embedded.ensure_local()
        try:
            assert time.monotonic() - t0 < 120
            assert embedded.ensure_local() == endpoint
            assert embedded.started_here()
            state = json.loads(embedded.state_file().read_text())
            assert state["pid"] != os.getpid() and state["owner_pid"] == os.getpid()
            assert state["endpoint"] == endpoint and state["started"] <= time.time()
            for fn in ("local_endpoint", "ensure_local"):
                out = subprocess.run([sys.executable, "-c", probe.format(fn)], capture_output=True, text=True,
                                     env=env, timeout=120, check=False)
                assert out.stdout.strip() == endpoint, out.stderr
            # The other process did not start (nor, at its exit, stop) a server.
            assert embedded.local_endpoint() == endpoint
        finally:
            assert embedded.stop_local() is True
        assert wait_until(lambda: pid_gone(state["pid"]), timeout=10)
        assert not embedded.state_file().exists()
        assert embedded.stop_local() is False
        assert embedded.local_endpoint() is None


def test_stale_state_file_is_ignored(tmp_path: Path) -> None:
    from xdask_jupyter import embedded

    with dask.config.set({"xdask.home": str(tmp_path)}):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        embedded.state_file().write_text(json.dumps({"pid": dead.pid, "endpoint": "http://127.0.0.1:1",
                                                     "owner_pid": dead.pid, "started": 0}))
        assert embedded.local_endpoint() is None
        # Alive pid, but nothing answers at the endpoint.
        embedded.state_file().write_text(json.dumps({"pid": os.getpid(), "endpoint": f"http://127.0.0.1:{free_port()}",
                                                     "owner_pid": os.getpid(), "started": 0}))
        assert embedded.local_endpoint() is None
        embedded.state_file().write_text("{torn")
        assert embedded.local_endpoint() is None


def test_rewrite_location() -> None:
    from xdask_jupyter.proxy import rewrite_location

    up = "http://127.0.0.1:9997"
    pmap = {"/dashboard": "/base/xdask/dashboard", "/": "/base/xdask/api"}
    assert rewrite_location("dashboard/", up, pmap) == "dashboard/"
    assert rewrite_location("./data", up, pmap) == "./data"
    assert rewrite_location("/dashboard", up, pmap) == "/base/xdask/dashboard"
    assert rewrite_location(f"{up}/dashboard/data?a=1", up, pmap) == "/base/xdask/dashboard/data?a=1"
    assert rewrite_location(f"{up}/v1/models", up, pmap) == "/base/xdask/api/v1/models"
    assert rewrite_location("https://elsewhere.example/x", up, pmap) == "https://elsewhere.example/x"
