"""Read an auth config file: Xinference's format, checked at startup.

The file is JSON (YAML is read too) with two sections, as Xinference's
``--auth-config`` file has them::

    {
      "auth_config": {"algorithm": "HS256", "secret_key": "<openssl rand -hex 32>",
                      "token_expire_in_minutes": 30},
      "user_config": [
        {"username": "user1", "password": "secret1", "permissions": ["admin"],
         "api_keys": ["sk-72tkvudyGLPMi", "sk-ZOTLIY4gt9w11"]}
      ]
    }

A password is a bcrypt hash (``xdask hash-password``) or, as in Xinference's
files, plain text (a warning is logged). An API key is ``sk-`` and 13 letters
or digits, unique across users. Anything wrong stops the server at startup
with :class:`AuthConfigError`, which says where in the file the problem is
(and never prints a key or a password).

Examples
--------
>>> settings = load_auth_config("auth.json")                 # doctest: +SKIP
>>> settings.users["user2"].scopes
frozenset({'models:list', 'models:read', 'inference'})
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

import pydantic

from xdask.auth import passwords, scopes

logger = logging.getLogger(__name__)

#: Xinference's API key format: ``sk-`` and 13 letters or digits (16 characters in all).
API_KEY_PATTERN = re.compile(r"^sk-[A-Za-z0-9]{13}$")

#: Algorithms the ``secret_key`` (one shared secret) can sign with, and the key length each wants (bytes).
ALGORITHMS: dict[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}


class AuthConfigError(ValueError):
    """The auth config file cannot be used; the message says where and why."""


class _AuthSection(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    algorithm: str = "HS256"
    secret_key: str
    token_expire_in_minutes: int = pydantic.Field(gt=0)


class _UserEntry(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    username: str = pydantic.Field(min_length=1)
    password: str = pydantic.Field(min_length=1)
    permissions: list[str]
    api_keys: list[str] = []


class _FileModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    auth_config: _AuthSection
    user_config: list[_UserEntry]


@dataclass(frozen=True)
class User:
    """One user of the file: ``permissions`` as written, ``scopes`` as the server checks them."""

    username: str
    password: str = field(repr=False)
    permissions: tuple[str, ...]
    scopes: frozenset[str]


@dataclass(frozen=True)
class AuthSettings:
    """A checked auth config: the token settings, the users, and their API keys (by SHA-256)."""

    algorithm: str
    secret_key: str = field(repr=False)
    token_expire_in_minutes: int
    users: dict[str, User]
    #: SHA-256 of each key -> username. Why digests: a lookup then reveals nothing about a key
    #: through its timing, and the keys' text is not kept in this table.
    key_owners: dict[bytes, str] = field(repr=False)
    source: str = ""


def key_digest(key: str) -> bytes:
    """The table index of an API key."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the file"


def _validation_message(exc: pydantic.ValidationError) -> str:
    problems = []
    for err in exc.errors():
        # Never the input value: it may be a password or a key.
        problems.append(f"{_where(tuple(err['loc']))}: {err['msg']}")
    return "; ".join(problems)


def _read(path: pathlib.Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"cannot read the auth config {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as json_error:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise AuthConfigError(f"auth config {path} is not valid YAML: {exc}") from None
        raise AuthConfigError(f"auth config {path} is not valid JSON: {json_error}") from None


def parse_auth_config(data: Any, source: str = "<auth config>") -> AuthSettings:
    """Check the decoded file ``data`` and build :class:`AuthSettings`; raises :class:`AuthConfigError`."""
    if not isinstance(data, dict):
        raise AuthConfigError(f"auth config {source}: the file must hold an object with auth_config and "
                              "user_config (Xinference's format)")
    try:
        model = _FileModel.model_validate(data)
    except pydantic.ValidationError as exc:
        raise AuthConfigError(f"auth config {source}: {_validation_message(exc)}") from None
    section = model.auth_config
    if section.algorithm not in ALGORITHMS:
        raise AuthConfigError(f"auth config {source}: auth_config.algorithm {section.algorithm!r} is not supported; "
                              f"use one of {', '.join(ALGORITHMS)} (the secret_key signs the tokens)")
    if not section.secret_key.strip():
        raise AuthConfigError(f"auth config {source}: auth_config.secret_key is empty; make one with "
                              "`openssl rand -hex 32`")
    if len(section.secret_key.encode("utf-8")) < ALGORITHMS[section.algorithm]:
        logger.warning("auth config %s: auth_config.secret_key is shorter than the %d bytes %s wants; "
                       "tokens are easier to forge (make one with `openssl rand -hex 32`)",
                       source, ALGORITHMS[section.algorithm], section.algorithm)
    if not model.user_config:
        raise AuthConfigError(f"auth config {source}: user_config lists no users, so nobody could use the server")
    users: dict[str, User] = {}
    owners: dict[bytes, str] = {}
    for i, entry in enumerate(model.user_config):
        where = f"user_config[{i}]"
        if entry.username in users:
            raise AuthConfigError(f"auth config {source}: {where}: username {entry.username!r} appears twice")
        try:
            granted = scopes.expand(entry.permissions)
        except scopes.UnknownScopeError as exc:
            raise AuthConfigError(f"auth config {source}: {where}.permissions: {exc}") from None
        for j, key in enumerate(entry.api_keys):
            if not API_KEY_PATTERN.match(key):
                raise AuthConfigError(f"auth config {source}: {where}.api_keys[{j}] is not an API key: it must be "
                                      "'sk-' and 13 letters or digits (16 characters in all)")
            digest = key_digest(key)
            if digest in owners:
                raise AuthConfigError(f"auth config {source}: {where}.api_keys[{j}] is also a key of user "
                                      f"{owners[digest]!r}; every key must be unique")
            owners[digest] = entry.username
        if not passwords.is_hashed(entry.password):
            logger.warning("auth config %s: user %r has a plain-text password; put a bcrypt hash there "
                           "(`xdask hash-password`)", source, entry.username)
        users[entry.username] = User(entry.username, entry.password, tuple(entry.permissions), granted)
    return AuthSettings(section.algorithm, section.secret_key, section.token_expire_in_minutes, users, owners,
                        source)


def load_auth_config(path: str | pathlib.Path) -> AuthSettings:
    """Read and check the auth config file at ``path``; raises :class:`AuthConfigError`."""
    path = pathlib.Path(path).expanduser()
    settings = parse_auth_config(_read(path), source=str(path))
    try:
        if path.stat().st_mode & 0o077:
            logger.warning("auth config %s can be read by other users of this machine and holds passwords and "
                           "API keys; `chmod 600` it", path)
    except OSError:
        pass
    return settings
