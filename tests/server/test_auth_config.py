"""Auth without a server: the config file (Xinference's example verbatim, bad files), scopes, passwords,
tokens, log redaction, and the route table against every route the app serves."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import jwt
import pytest

from xdask.auth import scopes
from xdask.auth.authenticator import Authenticator
from xdask.auth.config_file import AuthConfigError, load_auth_config, parse_auth_config
from xdask.auth.passwords import hash_password, is_hashed, verify_password
from xdask.auth.redact import RedactingFilter, redact
from xdask.errors import AuthenticationError, PermissionDeniedError

#: The example file of Xinference's "Authentication system" page, byte for byte.
XINFERENCE_EXAMPLE = """{
    "auth_config": {
        "algorithm": "HS256",
        "secret_key": "09d25e094faa6ca2556c818166b7a9563b93f7099f6f0f4caa6cf63b88e8d3e7",
        "token_expire_in_minutes": 30
    },
    "user_config": [
        {
            "username": "user1",
            "password": "secret1",
            "permissions": [
                "admin"
            ],
            "api_keys": [
                "sk-72tkvudyGLPMi",
                "sk-ZOTLIY4gt9w11"
            ]
        },
        {
            "username": "user2",
            "password": "secret2",
            "permissions": [
                "models:list",
                "models:read"
            ],
            "api_keys": [
                "sk-35tkasdyGLYMy",
                "sk-ALTbgl6ut981w"
            ]
        }
    ]
}
"""

SECRET = "09d25e094faa6ca2556c818166b7a9563b93f7099f6f0f4caa6cf63b88e8d3e7"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "auth.json"
    path.write_text(XINFERENCE_EXAMPLE)
    path.chmod(0o600)
    return path


def _base() -> dict[str, Any]:
    return json.loads(XINFERENCE_EXAMPLE)


# -- the file ---------------------------------------------------------------------------


def test_xinference_example_loads_verbatim(example: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xdask.auth"):
        settings = load_auth_config(example)
    assert settings.algorithm == "HS256" and settings.token_expire_in_minutes == 30
    assert set(settings.users) == {"user1", "user2"}
    assert settings.users["user1"].scopes == frozenset(scopes.SCOPES)  # admin: everything
    # Xinference's models:read is "use models": it keeps that meaning here.
    assert settings.users["user2"].scopes == {"models:list", "models:read", "inference"}
    assert settings.users["user2"].permissions == ("models:list", "models:read")
    assert len(settings.key_owners) == 4
    # Plain-text passwords work, with a warning that names the user, never the password.
    warnings = [r.getMessage() for r in caplog.records]
    assert any("user1" in w and "plain-text" in w for w in warnings)
    assert not any("secret1" in w or "secret2" in w for w in warnings)
    auth = Authenticator(settings)
    assert auth.authenticate("Bearer sk-ALTbgl6ut981w").username == "user2"
    assert auth.check_password("user1", "secret1") and not auth.check_password("user1", "secret2")


def test_world_readable_file_is_warned_about(example: Path, caplog: pytest.LogCaptureFixture) -> None:
    example.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="xdask.auth"):
        load_auth_config(example)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_yaml_file_loads(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "auth.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert set(load_auth_config(path).users) == {"user1", "user2"}


def _mutate(**changes: Any) -> dict[str, Any]:
    data = _base()
    for where, value in changes.items():
        node: Any = data
        parts = where.split("__")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if value is _DELETE:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return data


_DELETE = object()

BAD_FILES = [
    ({"auth_config": _DELETE}, r"auth_config: Field required"),
    ({"user_config": _DELETE}, r"user_config: Field required"),
    ({"auth_config__secret_key": _DELETE}, r"auth_config\.secret_key: Field required"),
    ({"auth_config__secret_key": "  "}, r"secret_key is empty"),
    ({"auth_config__algorithm": "RS256"}, r"algorithm 'RS256' is not supported"),
    ({"auth_config__token_expire_in_minutes": 0}, r"token_expire_in_minutes: Input should be greater than 0"),
    ({"auth_config__token_expire_in_minutes": "soon"}, r"token_expire_in_minutes: Input should be a valid integer"),
    ({"user_config": []}, r"lists no users"),
    ({"user_config__1__username": "user1"}, r"user_config\[1\]: username 'user1' appears twice"),
    ({"user_config__1__api_keys__0": "sk-72tkvudyGLPMi"},
     r"user_config\[1\]\.api_keys\[0\] is also a key of user 'user1'"),
    ({"user_config__0__api_keys__1": "sk-short"}, r"user_config\[0\]\.api_keys\[1\] is not an API key"),
    ({"user_config__0__api_keys__1": "pk-72tkvudyGLPMx"}, r"user_config\[0\]\.api_keys\[1\] is not an API key"),
    ({"user_config__0__api_keys__1": "sk-72tkvudy_LPMx"}, r"user_config\[0\]\.api_keys\[1\] is not an API key"),
    ({"user_config__1__permissions__0": "models:everything"}, r"unknown permission 'models:everything'"),
    ({"user_config__1__permissions": _DELETE}, r"user_config\[1\]\.permissions: Field required"),
    ({"user_config__0__password": ""}, r"user_config\[0\]\.password: String should have at least 1 character"),
    ({"user_config__0__pasword": "x"}, r"user_config\[0\]\.pasword: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_files_fail_clearly_without_secrets(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthConfigError, match=message) as info:
        parse_auth_config(_mutate(**changes), source="auth.json")
    text = str(info.value)
    assert text.startswith("auth config auth.json: ")
    for secret in ("secret1", "secret2", SECRET, "sk-72tkvudyGLPMi", "sk-short", "pk-72tkvudyGLPMx"):
        assert secret not in text


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read the auth config"):
        load_auth_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"auth_config": ')
    with pytest.raises(AuthConfigError, match="is not valid JSON"):
        load_auth_config(bad)
    with pytest.raises(AuthConfigError, match="must hold an object with auth_config and user_config"):
        parse_auth_config([], source="list")


# -- scopes and passwords --------------------------------------------------------------------


def test_scope_names_and_xinference_aliases() -> None:
    assert scopes.expand(["cache:*"]) == {"cache:list", "cache:delete"}
    assert scopes.expand(["models:start"]) == {"models:launch"}
    assert scopes.expand(["models:stop"]) == {"models:terminate"}
    assert scopes.expand(["models:write"]) == {"models:launch", "models:terminate"}
    assert scopes.expand(["models:unregister"]) == {"models:register"}
    assert scopes.expand(["inference"]) == {"inference"}
    assert scopes.expand([]) == frozenset()
    assert "admin" in scopes.expand(["admin"])
    with pytest.raises(scopes.UnknownScopeError):
        scopes.expand(["root"])


def test_passwords_bcrypt_and_plain() -> None:
    hashed = hash_password("correct horse", rounds=4)
    assert is_hashed(hashed) and hashed.startswith("$2b$04$")
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct hors", hashed)
    assert verify_password("plain", "plain") and not verify_password("plai", "plain")
    long = "p" * 100  # over bcrypt's 72 bytes: pre-hashed, and every byte counts
    assert verify_password(long, hash_password(long, rounds=4))
    assert not verify_password("p" * 99 + "q", hash_password(long, rounds=4))


def test_hashed_passwords_in_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _base()
    data["user_config"][0]["password"] = hash_password("s3cret!", rounds=4)
    with caplog.at_level(logging.WARNING, logger="xdask.auth"):
        auth = Authenticator(parse_auth_config(data))
    assert not any("'user1'" in r.getMessage() for r in caplog.records)  # hashed: no warning for user1
    assert auth.check_password("user1", "s3cret!")
    assert not auth.check_password("user1", "secret1")
    assert not auth.check_password("nobody", "secret1")


# -- credentials ------------------------------------------------------------------------


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(parse_auth_config(_base()))


def test_api_keys(auth: Authenticator) -> None:
    who = auth.authenticate("Bearer sk-72tkvudyGLPMi")
    assert (who.username, who.method) == ("user1", "api_key")
    assert auth.authenticate("bearer   sk-35tkasdyGLYMy ").username == "user2"
    for header, code in [(None, "missing_api_key"), ("", "missing_api_key"), ("Bearer", "invalid_api_key"),
                         ("Basic dXNlcjE6c2VjcmV0MQ==", "invalid_api_key"),
                         ("Bearer sk-72tkvudyGLPMj", "invalid_api_key"),
                         ("Bearer sk-72tkvudyGLPM", "invalid_api_key"), ("Bearer unused", "invalid_api_key")]:
        with pytest.raises(AuthenticationError) as info:
            auth.authenticate(header)
        assert info.value.code == code and info.value.status == 401


def test_tokens_login_expiry_and_forgery(auth: Authenticator) -> None:
    answer = auth.login("user2", "secret2")
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 30 * 60
    who = auth.authenticate(f"Bearer {answer['access_token']}")
    assert (who.username, who.method) == ("user2", "token")
    assert who.scopes == {"models:list", "models:read", "inference"}
    claims = jwt.decode(answer["access_token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "user2" and claims["scopes"] == ["models:list", "models:read"]  # Xinference's claims
    with pytest.raises(AuthenticationError, match="Incorrect username or password"):
        auth.login("user2", "wrong")
    with pytest.raises(AuthenticationError, match="Incorrect username or password"):
        auth.login("nobody", "secret2")

    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    expired = auth.create_token("user2", now=past, expires_in=dt.timedelta(minutes=30))
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate(f"Bearer {expired}")
    assert info.value.code == "token_expired"

    now = dt.datetime.now(dt.UTC)
    forged = [
        jwt.encode({"sub": "user1", "scopes": ["admin"], "exp": now + dt.timedelta(hours=1)}, "x" * 64,
                   algorithm="HS256"),                                         # wrong secret
        jwt.encode({"sub": "user1", "scopes": ["admin"]}, SECRET, algorithm="HS256"),   # no expiry
        jwt.encode({"sub": "ghost", "scopes": ["admin"], "exp": now + dt.timedelta(hours=1)}, SECRET,
                   algorithm="HS256"),                                         # no such user
        jwt.encode({"sub": "user1", "scopes": ["admin"], "exp": now + dt.timedelta(hours=1)}, None,
                   algorithm="none"),                                          # unsigned
        jwt.encode({"sub": "user1", "scopes": ["admin"], "exp": now + dt.timedelta(hours=1)}, SECRET,
                   algorithm="HS512"),                                         # another algorithm
    ]
    for token in forged:
        with pytest.raises(AuthenticationError) as info:
            auth.authenticate(f"Bearer {token}")
        assert info.value.code == "invalid_api_key"
    # A token never grants more than its user holds.
    greedy = jwt.encode({"sub": "user2", "scopes": ["admin"], "exp": now + dt.timedelta(hours=1)}, SECRET,
                        algorithm="HS256")
    assert auth.authenticate(f"Bearer {greedy}").scopes == {"models:list", "models:read", "inference"}


def test_authorize(auth: Authenticator) -> None:
    user2 = auth.authenticate("Bearer sk-35tkasdyGLYMy")
    auth.authorize(user2, ("inference",), "chat")
    with pytest.raises(PermissionDeniedError) as info:
        auth.authorize(user2, ("models:launch",), "launch a model")
    assert info.value.status == 403 and info.value.code == "insufficient_scope"
    assert "models:launch" in info.value.message and "user2" in info.value.message
    auth.authorize(auth.authenticate("Bearer sk-72tkvudyGLPMi"), ("admin",), "list workers")


# -- logs -------------------------------------------------------------------------------


def test_redact() -> None:
    token = Authenticator(parse_auth_config(_base())).create_token("user1")
    line = (f"401 GET /v1/models?api_key=sk-72tkvudyGLPMi&t={token} (127.0.0.1) Authorization: Bearer "
            "abcdefghijklmnopqrstuvwxyz")
    clean = redact(line)
    assert "sk-72tkvudyGLPMi" not in clean and token not in clean and "abcdefghijklmnop" not in clean
    assert clean.startswith("401 GET /v1/models?api_key=sk-***&t=<token> (127.0.0.1)")
    assert redact("nothing to see") == "nothing to see"
    prose = "send 'Authorization: Bearer <API key or token>'"
    assert redact(prose) == prose


def test_redacting_filter_cleans_messages_and_tracebacks() -> None:
    record = logging.LogRecord("tornado.access", logging.WARNING, __file__, 1, "%d %s",
                               (401, "GET /x/sk-72tkvudyGLPMi"), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == "401 GET /x/sk-***"
    try:
        raise ValueError("bad key sk-ZOTLIY4gt9w11")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    RedactingFilter().filter(record)
    assert "sk-ZOTLIY4gt9w11" not in logging.Formatter().format(record)


# -- the route table ----------------------------------------------------------------------

#: A concrete path for each route pattern of the app (a new route must be added here and to ROUTE_SCOPES).
SAMPLE_PATHS = [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/models", "/v1/models/m1",
    "/v1/models/m1/progress", "/v1/models/m1/cancel", "/v1/engines/gemma-3-270m", "/v1/cache/models",
    "/v1/cal_model_mem", "/v1/model_registrations/LLM", "/v1/model_registrations/LLM/my-llm", "/v1/cluster/auth",
    "/v1/cluster/workers", "/v1/cluster/health", "/status", "/dashboard", "/dashboard/", "/dashboard/data/models",
    "/dashboard/links/api", "/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
    "/v1/images/image2image", "/v1/images/files/abc.png", "/v1/audio/transcriptions", "/v1/audio/translations",
    "/v1/audio/speech", "/v1/files", "/v1/files/file-1", "/v1/files/file-1/content", "/v1/batches",
    "/v1/batches/batch_1", "/v1/batches/batch_1/cancel", "/token", "/healthz", "/readyz", "/metrics",
]


def app_routes(tmp_path: Path) -> list[tuple[Any, type]]:
    """(matcher, handler class) of every route ``make_app`` serves, built without a cluster."""
    import dask.config

    from xdask_server.app import make_app

    class NoCluster:
        async def known_models(self) -> list[str]:
            return []

    with dask.config.set({"xdask.home": str(tmp_path)}):
        app = make_app(NoCluster(), auth=None)  # type: ignore[arg-type]
    return [(rule.matcher, rule.target) for rule in app.wildcard_router.rules]


def implemented_methods(handler: type) -> list[str]:
    from tornado.web import RequestHandler

    return [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if getattr(handler, m.lower()) is not getattr(RequestHandler, m.lower())]


def test_every_route_and_method_has_a_row(tmp_path: Path) -> None:
    from xdask_server.route_scopes import find_row

    routes = app_routes(tmp_path)
    missing = []
    for matcher, handler in routes:
        samples = [p for p in SAMPLE_PATHS if matcher.regex.fullmatch(p)]
        assert samples, f"no sample path for route {matcher.regex.pattern} ({handler.__name__}): add one"
        for path in samples:
            for method in implemented_methods(handler):
                if find_row(method, path) is None:
                    missing.append(f"{method} {path} ({handler.__name__})")
    assert not missing, f"routes without a row in xdask_server.route_scopes.ROUTE_SCOPES: {missing}"


def test_rows_name_real_routes(tmp_path: Path) -> None:
    """No row is left over from a route that is gone: each matches some sample path."""
    from xdask_server.route_scopes import ROUTE_SCOPES

    for row in ROUTE_SCOPES:
        assert any(row.path.fullmatch(p) for p in SAMPLE_PATHS), f"row {row.path.pattern} matches no route"
