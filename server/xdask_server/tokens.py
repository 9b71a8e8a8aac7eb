"""HTTP binding of logging in: ``POST /token`` (Xinference's login) and ``GET /v1/cluster/auth``.

The credentials are checked by ``xdask.auth.Authenticator``; which routes
need which scope is ``route_scopes``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado import httputil, web

from xdask.auth.authenticator import Authenticator
from xdask.errors import InvalidRequestError
from xdask_server.base import BaseHandler


class ClusterAuthHandler(BaseHandler):
    """``GET /v1/cluster/auth``: whether this server requires credentials (Xinference clients ask first)."""

    def get(self) -> None:
        self.write_json({"auth": self.application.settings.get("auth") is not None})


class TokenHandler(BaseHandler):
    """``POST /token``: Xinference's login. An OAuth2 password form (or JSON) in, a bearer token out.

    ``username`` and ``password`` as ``application/x-www-form-urlencoded``
    (what OAuth2 clients and Xinference's client send) or as JSON; the answer
    is ``{"access_token": ..., "token_type": "bearer", "expires_in": seconds}``.
    """

    async def post(self) -> None:
        auth: Authenticator | None = self.application.settings.get("auth")
        if auth is None:
            raise InvalidRequestError("Authentication is off on this server: no login is needed",
                                      code="auth_disabled")
        username, password = self._credentials()
        # bcrypt takes ~0.2 s on purpose: off the event loop.
        self.write_json(await asyncio.to_thread(auth.login, username, password))

    def _credentials(self) -> tuple[str, str]:
        body = self.body()
        content_type = self.request.headers.get("Content-Type", "")
        fields: dict[str, Any] = {}
        if "json" in content_type:
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise InvalidRequestError("The login body is not valid JSON") from None
            fields = data if isinstance(data, dict) else {}
        else:
            args: dict[str, list[bytes]] = {}
            httputil.parse_body_arguments(content_type or "application/x-www-form-urlencoded", body, args, {},
                                          self.request.headers)
            fields = {k: v[0].decode("utf-8", "replace") for k, v in args.items() if v}
        username, password = fields.get("username"), fields.get("password")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise InvalidRequestError("username and password are required (an OAuth2 password form or JSON)",
                                      param="username" if not username else "password")
        return username, password


def routes() -> list[tuple[str, type[web.RequestHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [(r"/v1/cluster/auth", ClusterAuthHandler), (r"/token", TokenHandler)]
