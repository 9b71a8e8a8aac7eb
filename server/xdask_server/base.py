"""What every handler of the server shares: JSON in and out, OpenAI-style errors, capped bodies, hang-ups.

Every error leaves as an OpenAI-style JSON body with the status of its
``XdaskError`` class; Tornado's own errors (404 route, 405 method) too.
Request bodies, on every route and method, are streamed in and capped at
``xdask.server.max-body-size`` (uploads at their own limits): 413 beyond.
Every answer is counted for ``/metrics`` (``HttpStats``) by route, model and
status. ``TaskHandler`` is the one place where a client hanging up cancels
the work its request started.

Each API family has its own module of handlers (``chat``, ``models``,
``retrieval``, ``images``, ``audio``, ``batches``, ``monitoring``,
``dashboard``, ``tokens``), each exporting ``routes()``; ``app`` puts them
together.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
from tornado import web

from xdask import config
from xdask.api.base import validation_error
from xdask.auth.redact import redact
from xdask.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    XdaskError,
)
from xdask_server.stats import RequestStats, retry_after

if TYPE_CHECKING:
    from xdask.cluster.supervisor import Supervisor

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Bodies this many times over the limit are refused without reading them.
_REFUSE_UNREAD_FACTOR = 8

def _declares_body(handler: web.RequestHandler) -> bool:
    """Whether the request says a body follows (a length above 0, or chunks)."""
    headers = handler.request.headers
    return headers.get("Content-Length", "0").strip() not in ("", "0") \
        or "chunked" in headers.get("Transfer-Encoding", "").lower()


#: The HTTP methods whose handlers check the body cap before they run.
_METHODS = ("get", "post", "put", "patch", "delete")


def _body_checked(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` that first answers 413 when the request's body went over the cap."""
    @functools.wraps(method)
    def checked(self: BaseHandler, *args: Any, **kwargs: Any) -> Any:
        self._method_started = True  # Tornado calls the method once the whole body is in
        self.body()
        return method(self, *args, **kwargs)

    checked.body_checked = True  # type: ignore[attr-defined]
    return checked


@web.stream_request_body
class BaseHandler(web.RequestHandler):
    """JSON in and out, OpenAI-style errors, a capped request body, and a count of every answer.

    Why every handler streams its body: a handler that lets Tornado buffer
    the body gets it whole before any check runs (up to the connection's cap),
    and Tornado answers an oversized one with a bare 400; streamed, each
    handler counts what arrives against ``body_limit`` and answers 413.
    """

    #: The model uid the request named (set by ``parse``), for the metrics' ``model`` label.
    _model: str | None = None
    _http_recorded = False
    _body_cap: int | None = None
    _method_started = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each HTTP method a handler defines checks the body cap first, whether it reads the body or not.

        Why: Tornado runs the method once the body is in, with no hook in
        between; a route that takes no body must still answer 413 to an
        oversized one rather than ignore it.
        """
        super().__init_subclass__(**kwargs)
        for name in _METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "body_checked", False):
                setattr(cls, name, _body_checked(method))

    def body_limit(self) -> int:
        """The largest body this handler reads (uploads of audio and images allow more)."""
        return int(config.get("server.max-body-size"))

    def prepare(self) -> Any:
        self._start_body(check_length=True)

    def _start_body(self, check_length: bool = False) -> None:
        """Start counting the body; with ``check_length``, a ``Content-Length`` far over the limit is refused."""
        if self._body_cap is None:
            self._body_cap = self.body_limit()
            self._body_chunks: list[bytes] = []
            self._body_size = 0
        length = self.request.headers.get("Content-Length")
        if check_length and length is not None and length.isdigit() \
                and int(length) > self._body_cap * _REFUSE_UNREAD_FACTOR:
            raise PayloadTooLargeError(f"Request body of {length} bytes is over the limit of {self._body_cap}")

    def data_received(self, chunk: bytes) -> Any:
        self._start_body()
        self._body_size += len(chunk)
        if self._body_size <= (self._body_cap or 0):
            self._body_chunks.append(chunk)
        else:  # keep reading (so the client gets our answer) but keep nothing
            self._body_chunks.clear()

    def body(self) -> bytes:
        """The whole request body; 413 when it went over the limit."""
        self._start_body()
        if self._body_size > (self._body_cap or 0):
            raise PayloadTooLargeError(f"Request body of {self._body_size} bytes is over the limit of {self._body_cap}")
        return b"".join(self._body_chunks)

    def note_model(self, uid: Any) -> None:
        """The request is for model ``uid`` (the metrics label it only if such a model runs)."""
        if isinstance(uid, str):
            self._model = uid

    def on_finish(self) -> None:
        self._record_http(self.get_status())

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if not self._finished:
            self._record_http(499)  # the client hung up before the answer was complete

    def _record_http(self, status: int) -> None:
        if self._http_recorded:
            return
        self._http_recorded = True
        http = self.application.settings.get("http_stats")
        if http is None:
            return
        model = self._model if self._model and self.supervisor.knows(self._model) else ""
        http.record(self.application.settings["endpoint_labels"].get(type(self), "other"), model, status,
                    self.request.request_time())

    @property
    def supervisor(self) -> Supervisor:
        return self.application.settings["supervisor"]

    @property
    def stats(self) -> RequestStats:
        """This server's request statistics (dashboard, ``/metrics``, ``request_limits``)."""
        return self.application.settings["stats"]

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def check_xsrf_cookie(self) -> None:  # an API, not a form site
        return None

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not self._method_started and _declares_body(self):
            # Answered before the body was read (404 route, 405, 413 on the headers, a refused key): Tornado
            # closes the connection after this answer; say so, or a keep-alive client reuses it and fails.
            self.set_header("Connection", "close")
        if isinstance(exc, XdaskError):
            err = exc
        elif status_code == 405:
            err = MethodNotAllowedError(f"Method {self.request.method} is not allowed on {self.request.path}")
        elif status_code == 404:
            err = NotFoundError(f"No route {self.request.path}")
        elif 400 <= status_code < 500:
            err = InvalidRequestError(self._reason or "Bad request")
        else:
            err = XdaskError("Internal server error")
        err_status = err.status if isinstance(exc, XdaskError) else status_code
        self.set_status(err_status)
        self.set_header("Content-Type", "application/json")
        if isinstance(err, RateLimitError):
            wait = err.retry_after if err.retry_after is not None else retry_after()
            self.set_header("Retry-After", str(max(1, math.ceil(wait))))
        # A message may quote the request (a path, a value): never hand a credential back, or to a proxy's log.
        self.finish(redact(json.dumps(err.to_dict())))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, XdaskError):
            if self._finished:
                return
            if e.status >= 500:
                logger.warning("%s %s failed: %s", self.request.method, self.request.path, e)
            self.clear()
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        if isinstance(e, pydantic.ValidationError):
            return self._handle_request_exception(validation_error(e))
        super()._handle_request_exception(e)

    def parse(self, schema: type[pydantic.BaseModel]) -> Any:
        """The request body validated against ``schema`` (400 on any problem)."""
        req = schema.model_validate_json(self.body())
        self.note_model(getattr(req, "model", None))
        return req


class TaskHandler(BaseHandler):
    """A request answered by one awaited coroutine; the client hanging up cancels it at once.

    A task of its own, so that a hang-up cancels the work wherever it
    waits (for a replica's slot, for the next token, for an op's result)
    rather than at the next write that fails. A generation stops on the
    worker (the comm to it closes); a non-generative op (images, audio) runs
    to its end and its answer is dropped.
    """

    _task: asyncio.Future[Any] | None = None

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def run(self, coro: Awaitable[T]) -> tuple[bool, T | None]:
        """``(True, result)`` of ``coro``, or ``(False, None)`` when the client hung up first."""
        self._task = asyncio.ensure_future(coro)
        try:
            return True, await self._task
        except asyncio.CancelledError:
            return False, None


class NotFoundHandler(BaseHandler):
    """Unknown routes: a JSON 404 for any method."""

    def prepare(self) -> None:
        raise NotFoundError(f"No route {self.request.method} {self.request.path}")
