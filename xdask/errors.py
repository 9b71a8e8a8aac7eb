"""One exception hierarchy for xdask, mapped once to HTTP by the server.

Every error a user can cause or meet carries the HTTP status and the
OpenAI error ``type`` it maps to, so that the Tornado handlers, the Python
client and the CLI all speak of it the same way.

Errors cross a Dask comm (worker -> server, scheduler plugin -> client) as
``to_wire()`` dicts, which name the class, and come back with
``from_wire()`` as the same class with the same status: an error raised on
a worker reaches the HTTP client exactly as if it had been raised in the
server. ``from_dict()`` rebuilds one from an HTTP error body (the Python
client's side), through the same status table.

Examples
--------
>>> err = from_wire(HubNotFoundError("no such repo", code="hub_not_found").to_wire())
>>> type(err).__name__, err.status, err.code
('HubNotFoundError', 404, 'hub_not_found')
>>> from_wire(internal_wire(ValueError("boom"))).message
'ValueError: boom'
"""

from __future__ import annotations

from typing import Any, ClassVar

#: Every ``XdaskError`` class by name, filled as classes are defined: what ``from_wire`` looks up.
_CLASSES: dict[str, type[XdaskError]] = {}


class XdaskError(Exception):
    """Base class of xdask errors; also the server-side fallback (HTTP 500)."""

    status: int = 500
    type: str = "internal_error"
    #: Attributes beyond (message, param, code) that ``to_wire`` carries, e.g. ``retry_after``.
    wire_extras: ClassVar[tuple[str, ...]] = ()
    #: The ``code`` of an error raised without one (``None``: no code).
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict for a Dask comm: the class name, status, OpenAI fields and extras."""
        wire = {"error_class": type(self).__name__, "status": self.status, "type": self.type,
                "message": self.message, "param": self.param, "code": self.code}
        for name in self.wire_extras:
            wire[name] = getattr(self, name, None)
        return wire

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {message, type, param, code}}``.

        ``detail`` repeats the message because Xinference clients read it.
        """
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            },
            "detail": self.message,
        }


class InvalidRequestError(XdaskError):
    """The request is malformed or has values out of range (400)."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(XdaskError):
    """Missing or wrong credentials (401)."""

    status = 401
    type = "authentication_error"


class PermissionDeniedError(XdaskError):
    """The credentials are valid but lack the scope this request needs (403)."""

    status = 403
    type = "permission_error"


class NotFoundError(XdaskError):
    """An unknown model uid, family or route (404)."""

    status = 404
    type = "not_found_error"


class MethodNotAllowedError(XdaskError):
    """The route exists but not for this HTTP method (405)."""

    status = 405
    type = "invalid_request_error"


class ConflictError(XdaskError):
    """The name is taken, e.g. a model uid that is already running (409)."""

    status = 409
    type = "conflict_error"


class PayloadTooLargeError(XdaskError):
    """The request body is over ``xdask.server.max-body-size`` (413)."""

    status = 413
    type = "invalid_request_error"


class RateLimitError(XdaskError):
    """Too many requests: a model's ``request_limits`` or a replica's queue is full (429).

    ``retry_after`` (seconds) goes out as the ``Retry-After`` header, which the
    ``openai`` package honours when it retries.
    """

    status = 429
    type = "rate_limit_error"
    wire_extras = ("retry_after",)
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class ModelNotReadyError(XdaskError):
    """The model exists but cannot serve now: loading, lost or overloaded (503)."""

    status = 503
    type = "service_unavailable"


class InsufficientResourcesError(ModelNotReadyError):
    """No worker has room for the launch now: GPUs, memory, or a pinned worker (503)."""

    default_code = "insufficient_resources"


class EngineUnavailableError(InvalidRequestError):
    """No installed engine can run this model spec (400, says what to install)."""


class ModelLoadError(XdaskError):
    """The engine failed to load the model (500, with the engine's message)."""

    type = "model_load_error"


class GenerationError(XdaskError):
    """The engine failed while generating (500)."""

    type = "generation_error"


class WorkerLostError(ModelNotReadyError):
    """The Dask worker that held the model died or became unreachable (503)."""


class RequestTimeoutError(XdaskError):
    """The model took longer than ``xdask.server.request-timeout`` (504)."""

    status = 504
    type = "timeout_error"


class EmbeddedServerError(ModelNotReadyError):
    """The embedded ``xdask-local`` of a Jupyter session could not start (503).

    The message carries the tail of its output, because the process that
    failed is gone by the time a user reads the error.
    """

    default_code = "embedded_server_failed"


class UpstreamUnavailableError(XdaskError):
    """A proxy (the Jupyter extension) could not reach the xdask server behind it (502)."""

    status = 502
    type = "upstream_error"

    default_code = "upstream_unreachable"


class LaunchCancelledError(InvalidRequestError):
    """The launch was cancelled (``POST /v1/models/{uid}/cancel`` or Ctrl-C in ``xdask launch``): 400.

    400 rather than a non-standard 499 because every HTTP client and the
    OpenAI SDK treat it as a plain client error; ``code`` says what happened.
    """

    default_code = "launch_cancelled"


class DownloadCancelledError(LaunchCancelledError):
    """The model's download was cancelled; its partial files stay for a later launch to resume."""


class ModelDownloadError(XdaskError):
    """A model hub could not deliver the model's files (502: the fault is upstream of xdask)."""

    status = 502
    type = "model_download_error"

    default_code = "download_failed"


class HubAccessError(ModelDownloadError):
    """The hub refused access: a gated or private repo, or a rejected token (403)."""

    status = 403
    type = "permission_error"


class HubNotFoundError(ModelDownloadError):
    """The repo, revision or file is not on the hub (404)."""

    status = 404
    type = "not_found_error"


class HubUnreachableError(ModelDownloadError):
    """The hub cannot be reached: no network, a wrong endpoint, or it kept dropping the connection (502)."""


_CLASSES[XdaskError.__name__] = XdaskError

#: The one status table: the class an HTTP status (or a wire dict without a known class) comes back as.
_BY_STATUS: dict[int, type[XdaskError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ModelNotReadyError,
    504: RequestTimeoutError,
}

#: Error codes whose class is more specific than the one their HTTP status gives (HTTP bodies name no class).
_BY_CODE: dict[str, type[XdaskError]] = {
    "launch_cancelled": LaunchCancelledError,
    "gated_repo": HubAccessError,
    "hub_token_rejected": HubAccessError,
    "hub_not_found": HubNotFoundError,
    "hub_unreachable": HubUnreachableError,
    "download_failed": ModelDownloadError,
}


def _build(cls: type[XdaskError], fields: dict[str, Any], status: int) -> XdaskError:
    """An instance of ``cls`` with exactly these fields (subclasses' own ``__init__`` defaults bypassed)."""
    exc = cls.__new__(cls)
    XdaskError.__init__(exc, str(fields.get("message")), param=fields.get("param"), code=fields.get("code"))
    for name in cls.wire_extras:
        setattr(exc, name, fields.get(name))
    if exc.status != status:
        exc.status = status
    if fields.get("type") and fields["type"] != exc.type:
        exc.type = str(fields["type"])
    return exc


def internal_wire(exc: BaseException) -> dict[str, Any]:
    """Any exception as a wire dict: an ``XdaskError``'s own, else a 500 that names the exception."""
    if isinstance(exc, XdaskError):
        return exc.to_wire()
    return XdaskError(f"{type(exc).__name__}: {exc}").to_wire()


def from_wire(wire: dict[str, Any]) -> XdaskError:
    """Rebuild the error ``to_wire`` described: the same class, status and fields."""
    status = int(wire.get("status") or 500)
    cls = _CLASSES.get(str(wire.get("error_class"))) or _BY_CODE.get(str(wire.get("code"))) \
        or _BY_STATUS.get(status, XdaskError)
    return _build(cls, wire, status)


def from_dict(body: dict[str, Any], status: int) -> XdaskError:
    """Rebuild an error from an HTTP error body (used by the Python client)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        message = body.get("detail") if isinstance(body, dict) else None
        err = {"message": message or f"HTTP {status}"}
    cls = _BY_CODE.get(str(err.get("code"))) or _BY_STATUS.get(status, XdaskError)
    return _build(cls, {k: err.get(k) for k in ("message", "param", "code")}, status)
