"""Who is calling, and may they: API keys, JWT access tokens and the login that issues them.

Server-side and free of HTTP: the Tornado app (``xdask_server.route_scopes``) hands
it the ``Authorization`` header and the scopes a route needs.

- ``Authorization: Bearer sk-...``: an API key from the config file (the
  ``openai`` package sends its ``api_key`` this way).
- ``Authorization: Bearer <JWT>``: an access token from :meth:`Authenticator.login`
  (``POST /token``), signed with the file's ``secret_key`` and ``algorithm``,
  valid for ``token_expire_in_minutes``; claims ``sub`` (the user) and
  ``scopes`` (the user's permissions), as Xinference issues them.

Errors are :class:`~xdask.errors.AuthenticationError` (401: missing, wrong or
expired) and :class:`~xdask.errors.PermissionDeniedError` (403: valid, but
without the scope). Their messages never contain the credential.

Examples
--------
>>> auth = Authenticator.from_file("auth.json")                  # doctest: +SKIP
>>> who = auth.authenticate("Bearer sk-35tkasdyGLYMy")
>>> who.username, auth.authorize(who, ("inference",), "POST /v1/chat/completions")
('user2', None)
>>> token = auth.login("user2", "secret2")["access_token"]
>>> auth.authenticate(f"Bearer {token}").method
'token'
"""

from __future__ import annotations

import datetime as dt
import pathlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
import jwt.warnings

from xdask.auth import passwords, scopes
from xdask.auth.config_file import (
    API_KEY_PATTERN,
    AuthSettings,
    key_digest,
    load_auth_config,
)
from xdask.errors import AuthenticationError, PermissionDeniedError

# The config loader warns once about a short secret_key; PyJWT would warn on every request.
warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: the user, the scopes this credential grants, and how it came (api_key/token)."""

    username: str
    scopes: frozenset[str]
    method: str


def _missing() -> AuthenticationError:
    return AuthenticationError("Missing credentials: send 'Authorization: Bearer <API key or token>' "
                               "(an API key such as sk-..., or a token from POST /token or `xdask login`)",
                               code="missing_api_key")


def _invalid() -> AuthenticationError:
    return AuthenticationError("Invalid API key or token", code="invalid_api_key")


class Authenticator:
    """Checks credentials against one auth config; shared by every request of a server."""

    def __init__(self, settings: AuthSettings):
        self.settings = settings

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> Authenticator:
        """Load and check ``path``; raises :class:`~xdask.auth.config_file.AuthConfigError`."""
        return cls(load_auth_config(path))

    # -- credentials -> identity --------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Identity:
        """The caller behind an ``Authorization`` header value; raises ``AuthenticationError`` (401)."""
        if not authorization or not authorization.strip():
            raise _missing()
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError("Unsupported Authorization header: use 'Bearer <API key or token>'",
                                      code="invalid_api_key")
        if API_KEY_PATTERN.match(credential):
            return self._by_key(credential)
        return self._by_token(credential)

    def _by_key(self, key: str) -> Identity:
        owner = self.settings.key_owners.get(key_digest(key))
        user = self.settings.users.get(owner) if owner is not None else None
        if user is None:
            raise _invalid()
        return Identity(user.username, user.scopes, "api_key")

    def _by_token(self, token: str) -> Identity:
        s = self.settings
        try:
            claims = jwt.decode(token, s.secret_key, algorithms=[s.algorithm],
                                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The access token has expired; log in again (POST /token or `xdask login`)",
                                      code="token_expired") from None
        except jwt.InvalidTokenError:
            raise _invalid() from None
        user = s.users.get(str(claims.get("sub")))
        if user is None:  # a token of a user since removed from the file
            raise _invalid()
        raw = claims.get("scopes", [])
        names = [name for name in raw if isinstance(name, str)] if isinstance(raw, list) else []
        try:
            granted = scopes.expand(names)
        except scopes.UnknownScopeError:
            raise _invalid() from None
        # A token never grants more than its user holds now (the file may have changed since it was issued).
        return Identity(user.username, granted & user.scopes, "token")

    # -- identity -> allowed? ------------------------------------------------------------------

    @staticmethod
    def authorize(identity: Identity, needed: Iterable[str], what: str) -> None:
        """Return if ``identity`` holds any of ``needed``; else ``PermissionDeniedError`` (403)."""
        needed = tuple(needed)
        if scopes.allows(identity.scopes, needed):
            return
        wanted = " or ".join(repr(n) for n in needed)
        raise PermissionDeniedError(f"User {identity.username!r} may not {what}: it needs the {wanted} scope",
                                    code="insufficient_scope")

    # -- login ------------------------------------------------------------------------------

    def check_password(self, username: str, password: str) -> bool:
        """True if the user exists and the password matches (as slow for an unknown user: no user probing)."""
        user = self.settings.users.get(username)
        stored = user.password if user is not None else passwords.DUMMY_HASH
        ok = passwords.verify_password(password, stored)
        return ok and user is not None

    def create_token(self, username: str, now: dt.datetime | None = None,
                     expires_in: dt.timedelta | None = None) -> str:
        """A signed access token for ``username`` (who must exist) with the user's permissions."""
        user = self.settings.users[username]
        now = now or dt.datetime.now(dt.UTC)
        expires_in = expires_in or dt.timedelta(minutes=self.settings.token_expire_in_minutes)
        claims = {"sub": user.username, "scopes": list(user.permissions), "iat": now, "exp": now + expires_in}
        return jwt.encode(claims, self.settings.secret_key, algorithm=self.settings.algorithm)

    def login(self, username: str, password: str) -> dict[str, Any]:
        """Xinference's ``POST /token`` answer for a right username and password; else 401.

        Blocks for bcrypt's time (~0.2 s): call it off the event loop.
        """
        if not self.check_password(username, password):
            raise AuthenticationError("Incorrect username or password", code="invalid_credentials")
        return {"access_token": self.create_token(username), "token_type": "bearer",
                "expires_in": self.settings.token_expire_in_minutes * 60}

