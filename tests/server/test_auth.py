"""Auth end to end: a real ``xdask-local --auth-config`` and real clients (httpx, ``openai``, the CLI).

Every route is tried with a key of every scope (and with a token from ``POST
/token`` for the same user): a scope opens exactly the routes it names (the
answer may be any 2xx/4xx but 401/403, as the requests are harmless ones that
fail validation or name unknown things), and every other route is a 403. No
key, a wrong key, a forged or expired token: 401. Afterwards no key, token or
password is in the server's log files or output. A server without an auth
config is open.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import stat
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer, free_port

from xdask.auth.passwords import hash_password

SECRET = secrets.token_hex(32)
ALL = {"models:list", "models:read", "models:launch", "models:terminate", "models:register", "inference",
       "cache:list", "cache:delete", "admin"}

#: user -> (permissions in the file, the scopes they must grant: written out here, not computed).
USERS: dict[str, tuple[list[str], set[str]]] = {
    "lister": (["models:list"], {"models:list"}),
    "reader": (["models:read"], {"models:read", "inference"}),
    "launcher": (["models:launch"], {"models:launch"}),
    "terminator": (["models:terminate"], {"models:terminate"}),
    "registrar": (["models:register"], {"models:register"}),
    "inferer": (["inference"], {"inference"}),
    "cacher": (["cache:*"], {"cache:list", "cache:delete"}),
    "cachelister": (["cache:list"], {"cache:list"}),
    "admin": (["admin"], ALL),
    "nobody": ([], set()),
    # Xinference's own names, as its example file has them.
    "xinf": (["models:list", "models:read", "models:start", "models:stop"],
             {"models:list", "models:read", "inference", "models:launch", "models:terminate"}),
}
ADMIN_PASSWORD = "admin-Pa55word"


def _key() -> str:
    return "sk-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(13))


KEYS = {name: _key() for name in USERS}
PASSWORDS = {name: f"pw-{name}-{secrets.token_hex(4)}" for name in USERS}
PASSWORDS["admin"] = ADMIN_PASSWORD

#: Harmless requests, one or more per route: (method, path, httpx kwargs, scopes that open it; () = open).
#: Allowed ones fail validation (400) or name unknown things (404): nothing is launched or deleted.
FORM_IMAGE = {"files": {"image": ("a.png", b"not a png")}, "data": {"model": "nope", "prompt": "p"}}
FORM_AUDIO = {"files": {"file": ("a.wav", b"not a wav")}, "data": {"model": "nope"}}
REQUESTS: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("GET", "/v1/cluster/auth", {}, ()),
    ("GET", "/status", {}, ()),
    ("GET", "/healthz", {}, ()),
    ("GET", "/readyz", {}, ()),
    ("GET", "/metrics", {}, ("models:list",)),
    ("GET", "/v1/models", {}, ("models:list",)),
    ("GET", "/v1/models/nope", {}, ("models:list",)),
    ("POST", "/v1/models", {"json": {}}, ("models:launch",)),
    ("POST", "/v1/models/nope/cancel", {}, ("models:launch",)),
    ("GET", "/v1/models/nope/progress", {}, ("models:read", "models:launch")),
    ("DELETE", "/v1/models/nope", {}, ("models:terminate",)),
    ("GET", "/v1/model_registrations/LLM", {}, ("models:list",)),
    ("GET", "/v1/model_registrations/LLM/gemma-3-270m", {}, ("models:list",)),
    ("POST", "/v1/model_registrations/LLM", {"json": {"model": "{}"}}, ("models:register",)),
    ("DELETE", "/v1/model_registrations/LLM/nope", {}, ("models:register",)),
    ("GET", "/v1/engines/gemma-3-270m", {}, ("models:list",)),
    ("GET", "/v1/cal_model_mem", {}, ("models:list",)),
    ("GET", "/v1/cache/models", {}, ("cache:list",)),
    ("DELETE", "/v1/cache/models", {"params": {"model_version": "nope"}}, ("cache:delete",)),
    ("POST", "/v1/chat/completions", {"json": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}},
     ("inference",)),
    ("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}, ("inference",)),
    ("POST", "/v1/embeddings", {"json": {"model": "nope", "input": "hi"}}, ("inference",)),
    ("POST", "/v1/rerank", {"json": {"model": "nope", "query": "q", "documents": ["d"]}}, ("inference",)),
    ("POST", "/v1/images/generations", {"json": {"model": "nope", "prompt": "a cat"}}, ("inference",)),
    ("POST", "/v1/images/edits", FORM_IMAGE, ("inference",)),
    ("POST", "/v1/images/variations", FORM_IMAGE, ("inference",)),
    ("GET", "/v1/images/files/nope.png", {}, ("inference",)),
    ("POST", "/v1/audio/transcriptions", FORM_AUDIO, ("inference",)),
    ("POST", "/v1/audio/translations", FORM_AUDIO, ("inference",)),
    ("POST", "/v1/audio/speech", {"json": {"model": "nope", "input": "hi", "voice": "x"}}, ("inference",)),
    ("GET", "/v1/files", {}, ("inference",)),
    ("POST", "/v1/files", {"files": {"file": ("b.jsonl", b"{}\n")}, "data": {"purpose": "nope"}}, ("inference",)),
    ("GET", "/v1/files/file-nope", {}, ("inference",)),
    ("DELETE", "/v1/files/file-nope", {}, ("inference",)),
    ("GET", "/v1/files/file-nope/content", {}, ("inference",)),
    ("GET", "/v1/batches", {}, ("inference",)),
    ("POST", "/v1/batches", {"json": {}}, ("inference",)),
    ("GET", "/v1/batches/batch_nope", {}, ("inference",)),
    ("POST", "/v1/batches/batch_nope/cancel", {}, ("inference",)),
    ("GET", "/v1/cluster/workers", {}, ("admin",)),
    ("GET", "/v1/cluster/health", {}, ("models:list",)),
    ("GET", "/dashboard", {}, ("models:list",)),
    ("GET", "/dashboard/", {}, ("models:list",)),
    ("GET", "/dashboard/data/models", {}, ("models:list",)),
    ("GET", "/dashboard/links/api", {}, ("models:list",)),
]

#: Everything a credential was seen as during the tests (grepped for in the logs at the end).
SEEN_SECRETS: set[str] = set()


def write_auth_config(path: Path, expire_minutes: int = 30) -> Path:
    users = []
    for name, (permissions, _) in USERS.items():
        # The admin's password is a bcrypt hash; the others are plain text, as in Xinference's files.
        password = hash_password(ADMIN_PASSWORD, rounds=4) if name == "admin" else PASSWORDS[name]
        users.append({"username": name, "password": password, "permissions": permissions, "api_keys": [KEYS[name]]})
    path.write_text(json.dumps({
        "auth_config": {"algorithm": "HS256", "secret_key": SECRET, "token_expire_in_minutes": expire_minutes},
        "user_config": users,
    }, indent=2))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def auth_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdask-auth-home")


@pytest.fixture(scope="module")
def auth_server(auth_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    config_file = write_auth_config(tmp_path_factory.mktemp("auth-config") / "auth.json")
    srv = LocalServer(auth_home, args=["--auth-config", str(config_file)],
                      extra_env={"XDASK_API_KEY": "", "XDASK_AUTH_CONFIG": ""})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def anon(auth_server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_server.endpoint, timeout=120) as client:
        yield client


def call(client: httpx.Client, method: str, path: str, kwargs: dict[str, Any],
         credential: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    if credential:
        SEEN_SECRETS.add(credential)
    return client.request(method, path, headers=headers, **kwargs)


def login(client: httpx.Client, user: str) -> str:
    resp = client.post("/token", data={"username": user, "password": PASSWORDS[user]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 30 * 60
    SEEN_SECRETS.add(body["access_token"])
    return body["access_token"]


def assert_error(resp: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text}"
    body = resp.json()
    assert body["error"]["type"] == error_type and body["error"]["message"] and body["detail"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    return body


# -- the table: every route x every scope ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["api_key", "token"])
def test_each_scope_opens_exactly_its_routes(anon: httpx.Client, how: str) -> None:
    wrong: list[str] = []
    for user, (_, grants) in USERS.items():
        credential = KEYS[user] if how == "api_key" else login(anon, user)
        for method, path, kwargs, opened_by in REQUESTS:
            allowed = not opened_by or bool(grants & set(opened_by))
            resp = call(anon, method, path, kwargs, credential)
            if allowed and (resp.status_code in (401, 403) or resp.status_code >= 500 and resp.status_code != 503):
                wrong.append(f"{user} {method} {path}: {resp.status_code} (allowed) {resp.text[:160]}")
            elif not allowed:
                if resp.status_code != 403:
                    wrong.append(f"{user} {method} {path}: {resp.status_code} (should be 403) {resp.text[:160]}")
                else:
                    body = resp.json()["error"]
                    assert body["type"] == "permission_error" and body["code"] == "insufficient_scope"
                    assert user in body["message"] and any(s in body["message"] for s in opened_by)
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_missing_wrong_forged_and_expired_credentials_are_401(anon: httpx.Client) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = jwt.encode({"sub": "admin", "scopes": ["admin"], "exp": now - dt.timedelta(minutes=1)}, SECRET,
                         algorithm="HS256")
    forged = jwt.encode({"sub": "admin", "scopes": ["admin"], "exp": now + dt.timedelta(hours=1)}, "f" * 64,
                        algorithm="HS256")
    cases = {None: "missing_api_key", _key(): "invalid_api_key", "unused": "invalid_api_key",
             forged: "invalid_api_key", expired: "token_expired"}
    for credential, code in cases.items():
        for method, path, kwargs, opened_by in REQUESTS:
            resp = call(anon, method, path, kwargs, credential)
            if not opened_by:
                assert resp.status_code not in (401, 403), f"{method} {path} is open: {resp.text}"
                continue
            body = assert_error(resp, 401, "authentication_error")
            assert body["error"]["code"] == code, f"{method} {path}: {body}"
    resp = anon.get("/v1/models", headers={"Authorization": f"Basic {KEYS['admin']}"})
    assert_error(resp, 401, "authentication_error")
    # A big upload without a key is refused from its headers, its body unread (and the connection closed).
    resp = anon.post("/v1/files", content=b"x" * (16 << 20), headers={"Content-Type": "multipart/form-data; b=x"})
    assert_error(resp, 401, "authentication_error")
    assert resp.headers["Connection"] == "close"


@pytest.mark.slow
def test_login_and_cluster_auth(anon: httpx.Client) -> None:
    assert anon.get("/v1/cluster/auth").json() == {"auth": True}
    token = login(anon, "admin")  # a bcrypt-hashed password
    assert anon.get("/v1/cluster/workers", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    login(anon, "reader")  # a plain-text one
    resp = anon.post("/token", json={"username": "lister", "password": PASSWORDS["lister"]})  # JSON works too
    assert resp.status_code == 200 and resp.json()["access_token"]
    SEEN_SECRETS.add(resp.json()["access_token"])
    for data in ({"username": "admin", "password": "wrong"}, {"username": "ghost", "password": "x"}):
        resp = anon.post("/token", data=data)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_credentials"
    assert anon.post("/token", data={"username": "admin"}).status_code == 400
    # /status answers probes, but where the cluster is only to callers who may list models.
    assert "scheduler" not in anon.get("/status").json()
    assert "scheduler" not in anon.get("/status", headers={"Authorization": f"Bearer {KEYS['inferer']}"}).json()
    status = anon.get("/status", headers={"Authorization": f"Bearer {KEYS['lister']}"}).json()
    assert status["scheduler"].startswith("tcp://")


# -- real clients ----------------------------------------------------------------------------


@pytest.mark.slow
def test_openai_package_with_keys(auth_server: LocalServer, anon: httpx.Client) -> None:
    import openai

    def oai(user: str | None, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{auth_server.endpoint}/v1", api_key=key or KEYS[user or "nobody"],
                             max_retries=0, timeout=300)

    assert isinstance(oai("lister").models.list().data, list)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        oai("inferer").models.list()
    assert "models:list" in str(denied.value)
    with pytest.raises(openai.AuthenticationError):
        oai(None, key=_key()).models.list()
    with pytest.raises(openai.AuthenticationError):
        oai(None, key="unused").chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):  # past the gate: the model is unknown
        oai("inferer").chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])

    # A real model: launched and terminated by keys that may, used by one that may only infer.
    resp = call(anon, "POST", "/v1/models", {"json": {**DEFAULT_LAUNCH, "model_uid": "auth-gemma"}}, KEYS["launcher"])
    assert resp.status_code == 200, resp.text
    try:
        client = oai("inferer")
        reply = client.chat.completions.create(model="auth-gemma", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hi"}])
        assert reply.choices[0].message.content
        stream = client.completions.create(model="auth-gemma", prompt="1, 2, 3,", max_tokens=4, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices).strip()
        with pytest.raises(openai.PermissionDeniedError):
            oai("lister").chat.completions.create(model="auth-gemma", max_tokens=4,
                                                  messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.PermissionDeniedError):
            client.models.delete("auth-gemma")  # inference cannot terminate
    finally:
        resp = call(anon, "DELETE", "/v1/models/auth-gemma", {}, KEYS["terminator"])
        assert resp.status_code == 200, resp.text


@pytest.mark.slow
def test_python_client(auth_server: LocalServer) -> None:
    from xdask import Client
    from xdask.errors import AuthenticationError, PermissionDeniedError

    with Client(auth_server.endpoint, api_key=KEYS["lister"]) as client:
        assert client.auth_enabled() and isinstance(client.list_models(), dict)
    with Client(auth_server.endpoint, api_key=KEYS["nobody"]) as client, pytest.raises(PermissionDeniedError):
        client.list_models()
    with Client(auth_server.endpoint, api_key=_key()) as client:
        with pytest.raises(AuthenticationError):
            client.list_models()
        answer = client.login("admin", ADMIN_PASSWORD)  # then the token goes with every request
        SEEN_SECRETS.add(answer["access_token"])
        assert client.list_workers()


@pytest.mark.slow
def test_xinference_client_with_key_and_login(auth_server: LocalServer) -> None:
    """Xinference's own client asks /v1/cluster/auth, then sends its api_key, or logs in with JSON."""
    from xinference_client import RESTfulClient

    assert isinstance(RESTfulClient(auth_server.endpoint, api_key=KEYS["lister"]).list_models(), dict)
    with pytest.raises(RuntimeError, match="models:list"):
        RESTfulClient(auth_server.endpoint, api_key=KEYS["inferer"]).list_models()
    client = RESTfulClient(auth_server.endpoint)
    client.login("xinf", PASSWORDS["xinf"])
    SEEN_SECRETS.add(client._get_token() or "")
    assert isinstance(client.list_models(), dict)
    with pytest.raises(RuntimeError, match="Incorrect username or password"):
        RESTfulClient(auth_server.endpoint).login("xinf", "wrong")


def xdask_cli(endpoint: str, home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "XDASK_HOME": str(home), "XDASK_API_KEY": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "xdask.cli", *args, "--endpoint", endpoint], capture_output=True,
                          text=True, timeout=120, env=full_env, check=False)


@pytest.mark.slow
def test_cli_login_then_commands(auth_server: LocalServer, tmp_path: Path) -> None:
    home = tmp_path / "client-home"
    ep = auth_server.endpoint
    no_login = xdask_cli(ep, home, "list")
    assert no_login.returncode == 1 and "Missing credentials" in no_login.stderr and "Traceback" not in no_login.stderr

    bad = xdask_cli(ep, home, "login", "-u", "admin", "-p", "wrong")
    assert bad.returncode == 1 and "Incorrect username or password" in bad.stderr

    done = xdask_cli(ep, home, "login", "-u", "admin", "-p", ADMIN_PASSWORD)
    assert done.returncode == 0, done.stderr
    assert f"Logged in to {ep} as admin" in done.stdout
    tokens = home / "auth" / "tokens.json"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600 and stat.S_IMODE(tokens.parent.stat().st_mode) == 0o700
    stored = json.loads(tokens.read_text())[ep]
    assert stored["username"] == "admin"
    SEEN_SECRETS.add(stored["access_token"])

    for command in (["list"], ["workers"], ["registrations"], ["cached"]):
        proc = xdask_cli(ep, home, *command)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"

    # --api-key and XDASK_API_KEY win over the stored token.
    denied = xdask_cli(ep, home, "workers", "--api-key", KEYS["lister"])
    assert denied.returncode == 1 and "needs the 'admin' scope" in denied.stderr
    assert xdask_cli(ep, home, "list", env={"XDASK_API_KEY": KEYS["lister"]}).returncode == 0
    assert xdask_cli(ep, home, "workers", env={"XDASK_API_KEY": KEYS["lister"]}).returncode == 1

    assert "Logged out" in xdask_cli(ep, home, "logout").stdout
    assert xdask_cli(ep, home, "list").returncode == 1


@pytest.mark.slow
def test_jupyter_extension_passes_keys_through(auth_server: LocalServer, tmp_path: Path) -> None:
    """A real Jupyter server fronting the auth server: its own key, or the caller's X-Xdask-Authorization."""
    pytest.importorskip("jupyter_server")
    from support.jupyter_server import JupyterServer

    keyed = JupyterServer(tmp_path / "keyed", f"--XdaskExtension.endpoint={auth_server.endpoint}",
                          f"--XdaskExtension.api_key={KEYS['lister']}", env={"XDASK_API_KEY": ""})
    bare = JupyterServer(tmp_path / "bare", f"--XdaskExtension.endpoint={auth_server.endpoint}",
                         env={"XDASK_API_KEY": ""})
    try:
        assert keyed.http.get("/xdask/api/v1/models").status_code == 200
        assert keyed.http.get("/xdask/dashboard/").status_code == 200
        denied = keyed.http.get("/xdask/api/v1/cluster/workers")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
        own = {"X-Xdask-Authorization": f"Bearer {KEYS['admin']}"}
        assert keyed.http.get("/xdask/api/v1/cluster/workers", headers=own).status_code == 200
        missing = bare.http.get("/xdask/api/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert bare.http.get("/xdask/api/v1/models", headers={"X-Xdask-Authorization": KEYS["lister"]}).status_code \
            == 200
    finally:
        keyed.stop()
        bare.stop()


# -- no secrets in logs (runs after the tests above: pytest keeps file order) ---------------------


@pytest.mark.slow
def test_no_credentials_in_logs(auth_server: LocalServer, auth_home: Path, anon: httpx.Client) -> None:
    # Credentials where they do not belong: in URLs (which the access log writes) and a body that errors.
    for user in ("admin", "nobody"):
        anon.get(f"/v1/models?api_key={KEYS[user]}")
        anon.get(f"/v1/models/{KEYS[user]}", headers={"Authorization": f"Bearer {KEYS[user]}"})
        anon.post("/v1/chat/completions", json={"model": KEYS[user], "messages": [{"role": "user", "content": "x"}]},
                  headers={"Authorization": f"Bearer {KEYS['inferer']}"})
    SEEN_SECRETS.update(KEYS.values())
    logs = [p for p in (auth_home / "logs").rglob("*") if p.is_file()]
    assert logs, "the server wrote no log file"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "auth is on: 11 user(s)" in text  # the right log, and it is written
    output = "".join(auth_server.lines)
    secrets_found = [s[:6] + "..." for s in SEEN_SECRETS | set(PASSWORDS.values()) | {SECRET}
                     if s in text or s in output]
    assert not secrets_found, f"credentials in the server's logs or output: {secrets_found}"


# -- auth off, and bad config files --------------------------------------------------------------


@pytest.mark.slow
def test_without_auth_config_everything_is_open(server: LocalServer) -> None:
    with httpx.Client(base_url=server.endpoint, timeout=120) as client:
        assert client.get("/v1/cluster/auth").json() == {"auth": False}
        for method, path, kwargs, _ in REQUESTS:
            resp = client.request(method, path, **kwargs)
            assert resp.status_code not in (401, 403), f"{method} {path}: {resp.status_code} {resp.text}"
        assert client.get("/status").json()["scheduler"].startswith("tcp://")
        resp = client.post("/token", data={"username": "a", "password": "b"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "auth_disabled"


def test_bad_auth_config_stops_the_server_at_startup(tmp_path: Path) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text(json.dumps({"auth_config": {"secret_key": SECRET, "token_expire_in_minutes": 5},
                               "user_config": [{"username": "u", "password": "p", "permissions": ["admin"],
                                                "api_keys": ["sk-tooshort"]}]}))
    env = {**os.environ, "XDASK_HOME": str(tmp_path / "home"), "XDASK_AUTH_CONFIG": ""}
    port = str(free_port())
    runs = {
        "--auth-config": [sys.executable, "-m", "xdask.cli_local", "--port", port, "--auth-config", str(bad)],
        "XDASK_AUTH_CONFIG": [sys.executable, "-m", "xdask.cli_local", "--port", port],
        "xdask serve": [sys.executable, "-m", "xdask.cli", "serve", "--scheduler", "tcp://127.0.0.1:9", "--port", port,
                        "--auth-config", str(bad)],
    }
    for name, argv in runs.items():
        run_env = {**env, "XDASK_AUTH_CONFIG": str(bad)} if name == "XDASK_AUTH_CONFIG" else env
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=run_env, check=False)
        assert proc.returncode != 0, f"{name}: {proc.stdout}"
        assert "user_config[0].api_keys[0] is not an API key" in proc.stderr, f"{name}: {proc.stderr}"
        assert "sk-tooshort" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
        assert "serving at" not in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "xdask.cli_local", "--port", port, "--auth-config",
                              str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=120, env=env,
                             check=False)
    assert missing.returncode != 0 and "cannot read the auth config" in missing.stderr


# -- Jupyter: the extension's key goes upstream ------------------------------------------------------


def test_jupyter_proxy_sends_the_extension_key() -> None:
    from tornado.httputil import HTTPHeaders

    from xdask_jupyter.proxy import upstream_headers

    incoming = HTTPHeaders({"Authorization": "token jupyter-secret", "Cookie": "_xsrf=1", "Accept": "*/*"})
    assert upstream_headers(incoming) == {"Accept": "*/*"}
    assert upstream_headers(incoming, KEYS["inferer"])["Authorization"] == f"Bearer {KEYS['inferer']}"
    incoming.add("X-Xdask-Authorization", f"Bearer {KEYS['lister']}")
    out = upstream_headers(incoming, KEYS["inferer"])  # the caller's own key wins
    assert out["Authorization"] == f"Bearer {KEYS['lister']}" and "X-Xdask-Authorization" not in out
    assert "token jupyter-secret" not in out.values()


def test_jupyter_extension_key_trait(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jupyter_server")
    from xdask_jupyter.extension import XdaskExtension

    monkeypatch.setenv("XDASK_API_KEY", KEYS["inferer"])
    assert XdaskExtension().api_key == KEYS["inferer"]
    monkeypatch.delenv("XDASK_API_KEY")
    ext = XdaskExtension(api_key=KEYS["lister"])
    ext.initialize_settings()  # kernels started from here inherit it
    assert os.environ["XDASK_API_KEY"] == KEYS["lister"]
