"""Tornado handlers: HTTP binding only; the logic lives in ``serving``.

Every error leaves as an OpenAI-style JSON body with the status of its
``XdaskError`` class; Tornado's own errors (404 route, 405 method) too.
Request bodies, on every route and method, are streamed in and capped at
``xdask.server.max-body-size`` (uploads at their own limits): 413 beyond.
Every answer is counted for ``/metrics`` (``HttpStats``) by route, model and
status.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import pydantic
from tornado import web
from tornado.iostream import StreamClosedError

from xdask import config
from xdask.auth.redact import redact
from xdask.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    XdaskError,
)
from xdask.protocol import validation_error
from xdask.registry import custom as custom_models
from xdask_server.dashboard import Dashboard
from xdask_server.limits import retry_after
from xdask_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LaunchModelRequest,
    RegisterModelRequest,
)
from xdask_server.serving import OpenAIServing, describe, registrations

logger = logging.getLogger(__name__)

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
    def supervisor(self) -> Any:
        return self.application.settings["supervisor"]

    @property
    def serving(self) -> OpenAIServing:
        return self.application.settings["serving"]

    @property
    def dashboard(self) -> Dashboard:
        return self.application.settings["dashboard"]

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


class BodyHandler(BaseHandler):
    """A handler that takes a JSON body (every handler's body is capped: ``BaseHandler``)."""


class TaskBodyHandler(BodyHandler):
    """A POST answered by one awaited coroutine; the client hanging up cancels the wait.

    The model finishes what it started and the answer is dropped: non-generative
    ops (images, audio) cannot be stopped halfway.
    """

    def on_connection_close(self) -> None:
        super().on_connection_close()
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()

    async def run(self, coro: Any) -> tuple[bool, Any]:
        """``(True, result)`` of ``coro``, or ``(False, None)`` when the client hung up first."""
        self._task = asyncio.ensure_future(coro)
        try:
            return True, await self._task
        except asyncio.CancelledError:
            return False, None


class GenerationHandler(BodyHandler):
    """Shared POST logic of chat and completions: JSON answer or SSE stream."""

    schema: type[ChatCompletionRequest | CompletionRequest]

    def on_connection_close(self) -> None:
        super().on_connection_close()
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()  # aborts the comm, which cancels generation on the worker

    async def post(self) -> None:
        req = self.parse(self.schema)
        # A task of its own, so that a client hanging up cancels it at once, wherever it waits (for a slot,
        # for the next token), rather than at the next write that fails.
        self._task = asyncio.ensure_future(self._stream(req) if req.stream else self.serving.complete(req))
        try:
            body = await self._task
        except asyncio.CancelledError:
            return  # the client hung up
        if not req.stream:
            self.write_json(body)

    async def _stream(self, req: Any) -> None:
        chunks = self.serving.stream(req)
        try:
            first = await anext(chunks)  # errors before the first byte are plain HTTP errors
        except StopAsyncIteration:
            first = None
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        try:
            if first is not None:
                self.write(b"data: " + json.dumps(first).encode() + b"\n\n")
                await self.flush()
            try:
                async for chunk in chunks:
                    self.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    await self.flush()
            except XdaskError as exc:  # mid-stream: report in-band, as OpenAI does
                self.write(b"data: " + json.dumps(exc.to_dict()).encode() + b"\n\n")
            self.write(b"data: [DONE]\n\n")
            self.finish()
        except StreamClosedError:
            pass  # the client hung up; closing `chunks` cancels generation
        finally:
            await chunks.aclose()


class ChatCompletionsHandler(GenerationHandler):
    schema = ChatCompletionRequest


class CompletionsHandler(GenerationHandler):
    schema = CompletionRequest


class ModelsHandler(BodyHandler):
    """``GET /v1/models`` lists running models; ``POST`` launches one."""

    async def get(self) -> None:
        records = await self.supervisor.list_models()
        self.write_json({"object": "list", "data": [describe(r) for r in records]})

    async def post(self) -> None:
        req = self.parse(LaunchModelRequest)
        uid = await self.supervisor.launch(req.to_launch_dict())
        record = await self.supervisor.get_model(uid)
        self.write_json({"model_uid": uid, "model_engine": record["spec"]["model_engine"]})


class CacheModelsHandler(BaseHandler):
    """``GET /v1/cache/models[?model_name=]`` lists every worker's cache; ``DELETE ?model_version=`` removes one.

    The answers keep Xinference's shape (``{"list": [...]}``, ``{"result": true}``)
    and add where each entry is (``address``, ``worker_ip``) and what was removed.
    """

    async def get(self) -> None:
        model_name = self.get_query_argument("model_name", None) or None
        self.write_json({"list": await self.supervisor.cached_models(model_name)})

    async def delete(self) -> None:
        version = self.get_query_argument("model_version", None)
        raw = self.body()
        if version is None and raw:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
                raise InvalidRequestError("Request body is not valid JSON") from None
            version = body.get("model_version") if isinstance(body, dict) else None
        if not version:
            raise InvalidRequestError("model_version is required", param="model_version")
        removed = await self.supervisor.remove_cached(version)
        self.write_json({"result": True, "model_version": version, "removed": removed})


class MemoryEstimateHandler(BaseHandler):
    """``GET /v1/cal_model_mem?model_name=&size_in_billions=&model_format=&quantization=&context_length=``.

    ``xdask cal-model-mem`` over HTTP, computed on the server (which may fetch
    the model's config.json, a few KB, from Hugging Face).
    """

    async def get(self) -> None:
        from xdask.cluster.memory import estimate_catalog_model

        def arg(name: str) -> str | None:
            return self.get_query_argument(name, None) or None

        model_name = arg("model_name")
        if not model_name:
            raise InvalidRequestError("model_name is required", param="model_name")
        try:
            context = int(arg("context_length")) if arg("context_length") else None
            batch = int(arg("batch") or 1)
        except ValueError:
            raise InvalidRequestError("context_length and batch must be integers") from None
        if (context is not None and context < 1) or batch < 1:
            raise InvalidRequestError("context_length and batch must be positive", param="context_length"
                                      if context is not None and context < 1 else "batch")
        est = await asyncio.to_thread(
            estimate_catalog_model, model_name, arg("size_in_billions"), arg("model_format"), arg("quantization"),
            context, batch=batch, kv_cache_dtype=arg("kv_cache_dtype"),
        )
        self.write_json({"model_name": model_name, **est.to_dict()})


class LaunchProgressHandler(BaseHandler):
    """``GET /v1/models/{uid}/progress``: a launch's state and download progress (also once ready; 404 if unknown)."""

    async def get(self, uid: str) -> None:
        self.write_json(await self.supervisor.launch_progress(uid))


class LaunchCancelHandler(BaseHandler):
    """``POST /v1/models/{uid}/cancel``: stop a launch; its launch request answers 400 ``launch_cancelled``."""

    async def post(self, uid: str) -> None:
        self.write_json(await self.supervisor.cancel_launch(uid))


class EnginesHandler(BaseHandler):
    """``GET /v1/engines/{model_name}``: engine -> specs it can run on this cluster (or why not)."""

    async def get(self, model_name: str) -> None:
        self.write_json(await self.supervisor.engine_matrix(model_name))


class ModelHandler(BaseHandler):
    """``GET``/``DELETE /v1/models/{uid}``."""

    async def get(self, uid: str) -> None:
        self.write_json(describe(await self.supervisor.describe_model(uid)))

    async def delete(self, uid: str) -> None:
        await self.supervisor.terminate(uid)
        self.write_json({"id": uid, "object": "model", "deleted": True})


class RegistrationsHandler(BodyHandler):
    """``GET``/``POST /v1/model_registrations/{model_type}``, ``GET``/``DELETE .../{model_name}``.

    POST registers a custom family (``{"model": "<json>", "persist": bool}``),
    DELETE unregisters one; the logic is in ``xdask.registry.custom``.
    """

    async def get(self, model_type: str, model_name: str | None = None) -> None:
        detailed = self.get_query_argument("detailed", "false").lower() == "true"
        items = registrations(model_type, detailed or model_name is not None)
        if model_name is None:
            self.write_json(items)
            return
        for item in items:
            if item["model_name"] == model_name:
                self.write_json(item)
                return
        raise NotFoundError(f"Model family {model_name!r} is not registered", param="model_name")

    async def post(self, model_type: str, model_name: str | None = None) -> None:
        if model_name is not None:
            raise MethodNotAllowedError(f"POST a registration to /v1/model_registrations/{model_type}")
        req = self.parse(RegisterModelRequest)
        family = custom_models.register(model_type, req.model, persist=req.persist)
        self.write_json({"model_name": family.model_name, "model_type": family.model_type,
                         "persist": req.persist, "is_builtin": False})

    async def delete(self, model_type: str, model_name: str | None = None) -> None:
        if model_name is None:
            raise MethodNotAllowedError(f"DELETE /v1/model_registrations/{model_type}/<model_name>")
        custom_models.unregister(model_type, model_name)
        self.write_json({"model_name": model_name, "model_type": model_type, "deleted": True})


class ClusterWorkersHandler(BaseHandler):
    """``GET /v1/cluster/workers``: address, resources, used/free GPUs, models and memory of each worker."""

    async def get(self) -> None:
        self.write_json({"object": "list", "data": await self.supervisor.workers()})


class ClusterHealthHandler(BaseHandler):
    """``GET /v1/cluster/health``: 200 when all is well, 503 with the problems otherwise."""

    async def get(self) -> None:
        health = await self.supervisor.health()
        self.write_json(health, status=200 if health["status"] == "ok" else 503)


class HealthHandler(BaseHandler):
    """``GET /status``: the server and its scheduler answer."""

    async def get(self) -> None:
        from xdask_server.auth import caller_may  # imported here: auth's handlers build on this module

        info = await self.supervisor.client.scheduler.identity()
        answer = {"status": "ok", "scheduler": info.get("address"), "workers": len(info.get("workers", {}))}
        if not caller_may(self, "models:list"):
            del answer["scheduler"]  # open to probes; where the cluster is, only to callers who may list models
        self.write_json(answer)


# -- dashboard (logic and URL layout: dashboard.py) ----------------------------------


class DashboardRedirectHandler(BaseHandler):
    """``GET /dashboard`` → ``dashboard/``: the page lives under the slash so its relative URLs resolve.

    The Location is relative, so the same answer is right here and behind
    Jupyter's proxy (``/xdask/dashboard`` → ``/xdask/dashboard/``).
    """

    def get(self) -> None:
        query = f"?{self.request.query}" if self.request.query else ""
        self.redirect("dashboard/" + query)


class DashboardApiLinkHandler(BaseHandler):
    """``GET /dashboard/links/api`` → ``/v1/models``: the header's API link.

    A rooted Location, unlike the page's URLs: a proxy (Jupyter's maps ``/``
    to its API prefix) rewrites it, while no relative URL is right both here
    and behind the proxy, where the API is not a sibling of the dashboard.
    """

    def get(self) -> None:
        self.redirect("/v1/models")


class DashboardPageHandler(BaseHandler):
    """``GET /dashboard/``: the dashboard's HTML (built once, then cached)."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")

    async def get(self) -> None:
        page = await self.dashboard.page()
        self._etag = page.etag
        self.set_header("Cache-Control", "no-cache")  # revalidate: a new server version has a new page
        self.finish(page.html)

    def compute_etag(self) -> str | None:
        return getattr(self, "_etag", None)  # precomputed: hashing 2 MB per request is waste


class DashboardDataHandler(BaseHandler):
    """``GET /dashboard/data/<name>``: the columns one of the page's sources polls for."""

    async def get(self, name: str) -> None:
        data = await self.dashboard.data(name)
        self.set_header("Cache-Control", "no-store")
        self.write_json(data)


class NotFoundHandler(BaseHandler):
    """Unknown routes: a JSON 404 for any method."""

    def prepare(self) -> None:
        raise NotFoundError(f"No route {self.request.method} {self.request.path}")
