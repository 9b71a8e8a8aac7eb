"""The client side: where a caller's credential comes from, and the tokens ``xdask login`` keeps.

:func:`resolve_api_key` picks the credential a client sends to an endpoint:
the one passed in, else ``XDASK_API_KEY`` (``xdask.api-key``), else the token
``xdask login`` stored for that endpoint. Tokens live in
``XDASK_HOME/auth/tokens.json`` (endpoint -> token), a file only its owner
can read or write (0600, in a 0700 folder).

Examples
--------
>>> save_token("http://127.0.0.1:9997", "eyJ...", username="user1", expires_in=1800)  # doctest: +SKIP
PosixPath('/root/.xdask/auth/tokens.json')
>>> resolve_api_key("http://127.0.0.1:9997/")                                          # doctest: +SKIP
'eyJ...'
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
import time
from typing import Any

from xdask import config


def tokens_file() -> pathlib.Path:
    """``XDASK_HOME/auth/tokens.json`` (its folder made 0700 on demand)."""
    folder = config.home() / "auth"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        folder.chmod(0o700)
    return folder / "tokens.json"


def _key(endpoint: str) -> str:
    return endpoint.strip().rstrip("/")


def _load() -> dict[str, Any]:
    # Not config.home(): reading (each Client does) must not create XDASK_HOME.
    path = pathlib.Path(os.path.expanduser(str(config.get("home")))) / "auth" / "tokens.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, Any]) -> pathlib.Path:
    path = tokens_file()
    # Written to a 0600 temp file then renamed: the token is never readable by others, even for a moment.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokens.", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_token(endpoint: str, token: str, *, username: str | None = None,
               expires_in: float | None = None) -> pathlib.Path:
    """Keep ``token`` for ``endpoint``; returns the file it went to."""
    data = _load()
    data[_key(endpoint)] = {
        "access_token": token,
        "username": username,
        "expires_at": time.time() + expires_in if expires_in else None,
    }
    return _write(data)


def stored_token(endpoint: str) -> str | None:
    """The token ``xdask login`` stored for ``endpoint``, if any (expired ones too: the server says so)."""
    entry = _load().get(_key(endpoint))
    token = entry.get("access_token") if isinstance(entry, dict) else None
    return token if isinstance(token, str) and token else None


def forget_token(endpoint: str) -> bool:
    """Drop the stored token of ``endpoint``; True if there was one."""
    data = _load()
    if data.pop(_key(endpoint), None) is None:
        return False
    _write(data)
    return True


def resolve_api_key(endpoint: str, api_key: str | None = None) -> str | None:
    """The credential to send to ``endpoint``: ``api_key``, else ``XDASK_API_KEY``, else a stored token."""
    if api_key:
        return api_key
    configured = config.get("api-key")
    if configured:
        return str(configured)
    return stored_token(endpoint)
