"""Which scope each route needs, and the gate that checks it before any handler runs.

:data:`ROUTE_SCOPES` is the one table of the server's routes and the scopes
that open them (any one of a row's scopes is enough; ``admin`` opens all).
:class:`GuardedApplication` checks it for every request, as soon as the
request's headers are in and before any handler runs or any body is read,
so a route added later cannot forget it: a route missing from the table needs
``admin``, and the auth tests fail until it gets its row. The login routes are ``tokens``.

With no auth config the gate lets everything through (``GET
/v1/cluster/auth`` answers ``{"auth": false}``), which is how ``xdask-local``
runs on 127.0.0.1 by default.

Examples
--------
>>> required_scopes("POST", "/v1/chat/completions")
('inference',)
>>> required_scopes("DELETE", "/v1/models/my-model")
('models:terminate',)
>>> required_scopes("GET", "/v1/cluster/auth")
()
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from tornado import httputil, web

from xdask import config
from xdask.auth.authenticator import Authenticator, Identity
from xdask.auth.scopes import SCOPES, allows
from xdask.errors import (
    AuthenticationError,
    PermissionDeniedError,
    XdaskError,
)
from xdask_server.base import BaseHandler

logger = logging.getLogger(__name__)

#: A row's scopes when the route is open to everyone.
PUBLIC: tuple[str, ...] = ()

#: What a route with no row needs: fail closed.
UNLISTED: tuple[str, ...] = ("admin",)


@dataclass(frozen=True)
class RouteScope:
    """A row of the table: HTTP methods, a path (a regex matched in full) and the scopes that open it."""

    methods: frozenset[str]
    path: re.Pattern[str]
    scopes: tuple[str, ...]
    #: What the row is, for the README's table and the 403 message.
    what: str


def _row(methods: str, path: str, scopes: tuple[str, ...] | str, what: str) -> RouteScope:
    wanted = (scopes,) if isinstance(scopes, str) else scopes
    unknown = [s for s in wanted if s not in SCOPES]
    assert not unknown, f"unknown scopes {unknown} in the route table"
    return RouteScope(frozenset(methods.split()), re.compile(path), wanted, what)


_ID = r"[^/]+"

#: Every route of the server and the scopes that open it (see xdask.auth.scopes for what each means).
ROUTE_SCOPES: tuple[RouteScope, ...] = (
    # Open: a client asks whether auth is on before it logs in; probes need no key.
    _row("GET", r"/v1/cluster/auth", PUBLIC, "ask whether auth is on"),
    _row("POST", r"/token", PUBLIC, "log in (username and password)"),
    _row("GET", r"/status", PUBLIC, "check the server answers (the scheduler's address needs models:list)"),
    _row("GET", r"/healthz", PUBLIC, "probe liveness"),
    _row("GET", r"/readyz", PUBLIC, "probe readiness"),
    # Using models.
    _row("POST", r"/v1/chat/completions", "inference", "chat with a model"),
    _row("POST", r"/v1/completions", "inference", "complete text"),
    _row("POST", r"/v1/embeddings", "inference", "embed text"),
    _row("POST", r"/v1/rerank", "inference", "rerank documents"),
    _row("POST", r"/v1/images/(?:generations|edits|variations|image2image)", "inference", "make images"),
    _row("GET", rf"/v1/images/files/{_ID}", "inference", "fetch a generated image"),
    _row("POST", r"/v1/audio/(?:transcriptions|translations|speech)", "inference", "transcribe or speak"),
    _row("GET POST", r"/v1/files", "inference", "upload or list batch files"),
    _row("GET DELETE", rf"/v1/files/{_ID}", "inference", "read or delete a batch file"),
    _row("GET", rf"/v1/files/{_ID}/content", "inference", "download a batch file"),
    _row("GET POST", r"/v1/batches", "inference", "create or list batches"),
    _row("GET", rf"/v1/batches/{_ID}", "inference", "read a batch"),
    _row("POST", rf"/v1/batches/{_ID}/cancel", "inference", "cancel a batch"),
    # Running models.
    _row("GET", r"/v1/models", "models:list", "list running models"),
    _row("GET", rf"/v1/models/{_ID}", "models:list", "describe a model"),
    _row("POST", r"/v1/models", "models:launch", "launch a model"),
    _row("POST", rf"/v1/models/{_ID}/cancel", "models:launch", "cancel a launch"),
    # Whoever may launch may watch the launch (xdask launch draws its download bar from this).
    _row("GET", rf"/v1/models/{_ID}/progress", ("models:read", "models:launch"), "read a launch's progress"),
    _row("DELETE", rf"/v1/models/{_ID}", "models:terminate", "terminate a model"),
    # The catalog.
    _row("GET", rf"/v1/model_registrations/{_ID}(?:/{_ID})?", "models:list", "read model registrations"),
    # POST .../{type} registers, DELETE .../{type}/{name} unregisters (the other shapes answer 405).
    _row("POST DELETE", rf"/v1/model_registrations/{_ID}(?:/{_ID})?", "models:register",
         "register or unregister a custom model"),
    _row("GET", rf"/v1/engines/{_ID}", "models:list", "query a model's engines"),
    _row("GET", r"/v1/cal_model_mem", "models:list", "estimate a model's memory"),
    # The model cache on the workers.
    _row("GET", r"/v1/cache/models", "cache:list", "list cached models"),
    _row("DELETE", r"/v1/cache/models", "cache:delete", "delete cached models"),
    # The cluster and what watches it.
    _row("GET", r"/v1/cluster/workers", "admin", "list the cluster's workers"),
    _row("GET", r"/v1/cluster/health", "models:list", "read the cluster's health"),
    # Prometheus sends a key as any client does (scrape config: authorization.credentials).
    _row("GET", r"/metrics", "models:list", "read the metrics"),
    _row("GET", r"/dashboard(?:/|/data/[a-z]+|/links/api)?", "models:list", "view the dashboard"),
)


def find_row(method: str, path: str) -> RouteScope | None:
    """The table's row for ``method path`` (HEAD reads as GET), or None."""
    method = "GET" if method == "HEAD" else method
    for row in ROUTE_SCOPES:
        if method in row.methods and row.path.fullmatch(path):
            return row
    return None


def required_scopes(method: str, path: str) -> tuple[str, ...]:
    """The scopes that open ``method path`` (any one suffices); ``()`` for an open route."""
    row = find_row(method, path)
    return row.scopes if row is not None else UNLISTED


def identity_of(request: httputil.HTTPServerRequest) -> Identity | None:
    """Who the gate found behind ``request`` (None: auth off, or no valid credential on an open route)."""
    return getattr(request, "xdask_identity", None)


def caller_may(handler: web.RequestHandler, scope: str) -> bool:
    """True if auth is off, or the caller of ``handler``'s request holds ``scope``."""
    if handler.application.settings.get("auth") is None:
        return True
    identity = identity_of(handler.request)
    return identity is not None and allows(identity.scopes, (scope,))


def check_request(auth: Authenticator, request: httputil.HTTPServerRequest) -> Identity | None:
    """Authenticate and authorize ``request`` against the table; raises 401/403 errors."""
    method, path = request.method or "GET", request.path
    header = request.headers.get("Authorization")
    row = find_row(method, path)
    needed = row.scopes if row is not None else UNLISTED
    if not needed:
        # Open route: note who called if they said (for details such as /status's), never refuse.
        try:
            return auth.authenticate(header) if header else None
        except AuthenticationError:
            return None
    identity = auth.authenticate(header)
    auth.authorize(identity, needed, row.what if row is not None else f"{method} this route")
    return identity


@web.stream_request_body
class AuthErrorHandler(BaseHandler):
    """Answers a request the gate refused (401/403), dropping its body.

    Why the body is read at all: a connection whose request body is left
    unread is closed after the answer, and a client that sends its next
    request on it (keep-alive) meets a reset. So a body up to
    ``xdask.server.max-body-size`` is read and dropped as it arrives, and the
    answer comes after it; a larger one is refused unread and the connection
    closed (``Connection: close``).
    """

    def initialize(self, error: XdaskError) -> None:
        self.error = error
        self._unread = False

    def prepare(self) -> None:
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > int(config.get("server.max-body-size")):
            self._unread = True
            raise self.error

    def data_received(self, chunk: bytes) -> None:
        """Bodies of refused requests are dropped."""

    def _refuse(self, *args: Any) -> None:
        raise self.error

    get = head = post = put = patch = delete = options = _refuse

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if isinstance(self.error, AuthenticationError):
            self.set_header("WWW-Authenticate", 'Bearer realm="xdask"')
        elif isinstance(self.error, PermissionDeniedError):
            self.set_header("WWW-Authenticate", 'Bearer realm="xdask", error="insufficient_scope"')
        if self._unread:
            self.set_header("Connection", "close")
        super().write_error(status_code, **kwargs)


class GuardedApplication(web.Application):
    """A Tornado application that checks :data:`ROUTE_SCOPES` before a request reaches its handler.

    The authenticator is ``settings["auth"]`` (None: auth off). Unknown routes
    still answer 404 (the default handler), whoever asks.
    """

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        delegate = super().find_handler(request, **kwargs)
        auth: Authenticator | None = self.settings.get("auth")
        if auth is None or delegate.handler_class is self.settings.get("default_handler_class"):
            return delegate
        try:
            request.xdask_identity = check_request(auth, request)  # type: ignore[attr-defined]
        except XdaskError as err:
            return self.get_handler_delegate(request, AuthErrorHandler, {"error": err})
        return delegate


def authenticator_from_config(path: str | None = None) -> Authenticator | None:
    """The authenticator of ``path``, else of ``xdask.auth-config`` (``XDASK_AUTH_CONFIG``), else None.

    Raises :class:`~xdask.auth.config_file.AuthConfigError` for a file that
    cannot be used: a server must not start open when it was told to guard.
    """
    path = path or config.get("auth-config") or None
    if not path:
        return None
    auth = Authenticator.from_file(str(path))
    logger.info("auth is on: %d user(s) from %s", len(auth.settings.users), auth.settings.source)
    return auth
