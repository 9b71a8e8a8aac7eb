"""The Jupyter server extension: xdask's REST API and dashboard under ``<base_url>xdask/``.

Enabled on install (``jupyter server extension list`` shows ``xdask_jupyter``).
Which xdask server it fronts is ``c.XdaskExtension.endpoint`` (or
``--XdaskExtension.endpoint=``), else the ``XDASK_ENDPOINT`` variable, else
``"auto"``:

- a URL: proxy to that server, start nothing;
- ``"local"``: the embedded ``xdask-local`` shared with notebooks
  (:mod:`xdask_jupyter.embedded`), started by the first request that needs it;
- ``"auto"``: xdask's default endpoint (``xdask.endpoint``) if it answers,
  else an embedded server already running, else one started on demand.

Routes (all behind Jupyter's login):

===============================  ===============================================================
``GET /xdask/info``               endpoint, mode, whether it runs, dashboard URL, version; starts nothing
``POST /xdask/local``             start (or reuse) the embedded server; its endpoint
``DELETE /xdask/local``           stop the embedded server if this Jupyter server started it
``/xdask/api/<path>``             any method, proxied to ``{endpoint}/<path>`` (SSE streamed)
``/xdask/dashboard<rest>``        proxied to ``{endpoint}/dashboard<rest>`` (HTML, JSON, JS)
===============================  ===============================================================

Examples
--------
In ``jupyter_server_config.py``::

    c.XdaskExtension.endpoint = "http://10.0.0.5:9997"
    c.XdaskExtension.api_key = "sk-72tkvudyGLPMi"   # if that server has auth on (or XDASK_API_KEY)

then, with the Jupyter token::

    curl -H "Authorization: token $T" http://localhost:8888/xdask/api/v1/models
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Unicode, default, validate

import xdask
from xdask import config
from xdask.errors import ConflictError, XdaskError
from xdask_jupyter import embedded
from xdask_jupyter.proxy import ProxyMixin, make_client

#: URL prefix of every route, under the server's base_url.
PREFIX = "xdask"


class XdaskExtension(ExtensionApp):
    """Jupyter server extension app: resolves the xdask endpoint and serves the ``/xdask/`` routes.

    Configurable as ``c.XdaskExtension.endpoint``. One instance per Jupyter
    server; the handlers reach it as ``self.extensionapp``.
    """

    name = "xdask_jupyter"

    endpoint = Unicode(
        help="""The xdask server behind /xdask/: a URL, "local" (an embedded xdask-local started on demand)
        or "auto" (xdask's default endpoint if it answers, else the embedded one). Default: XDASK_ENDPOINT
        if set, else "auto".""",
    ).tag(config=True)

    @default("endpoint")
    def _default_endpoint(self) -> str:
        return os.environ.get("XDASK_ENDPOINT", "").strip() or "auto"

    @validate("endpoint")
    def _validate_endpoint(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"]).strip()
        if value.lower() in ("", "auto", "local"):
            return value.lower() or "auto"
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"XdaskExtension.endpoint must be a http(s) URL, 'local' or 'auto', not {value!r}")
        return value.rstrip("/")

    api_key = Unicode(
        help="""The API key (sk-...) or token this Jupyter server sends to an xdask server with auth on, for
        requests that bring no X-Xdask-Authorization header of their own. Kernels started by this server get it
        as XDASK_API_KEY, so widgets and magics send it too. Default: XDASK_API_KEY if set, else none.""",
    ).tag(config=True)

    @default("api_key")
    def _default_api_key(self) -> str:
        return os.environ.get("XDASK_API_KEY", "").strip()

    def initialize_settings(self) -> None:
        """Hand the configured key to the kernels this server starts (they inherit its environment)."""
        if self.api_key and not os.environ.get("XDASK_API_KEY"):
            os.environ["XDASK_API_KEY"] = self.api_key

    #: The endpoint requests go to in "local"/"auto" mode, once found (None: find it again).
    _resolved: str | None = None
    _client: httpx.AsyncClient | None = None
    _resolve_lock: asyncio.Lock | None = None

    @property
    def mode(self) -> str:
        """``"proxy"`` (a fixed URL), ``"local"`` or ``"auto"``."""
        return self.endpoint if self.endpoint in ("local", "auto") else "proxy"

    def http_client(self) -> httpx.AsyncClient:
        """The upstream client shared by all proxy requests (made on first use, on the server's loop)."""
        if self._client is None:
            self._client = make_client()
        return self._client

    def initialize_handlers(self) -> None:
        """Register the ``/xdask/`` routes (ExtensionApp joins them with the server's base_url)."""
        self.handlers.extend([
            (rf"/{PREFIX}/info", InfoHandler),
            (rf"/{PREFIX}/local", LocalHandler),
            (rf"/{PREFIX}/api/(.*)", ApiProxyHandler),
            (rf"/{PREFIX}/dashboard(|/.*)", DashboardProxyHandler),
        ])
        self.log.info("xdask: /%s/ fronts %s", PREFIX, self.endpoint)

    async def current_endpoint(self) -> str | None:
        """The endpoint requests would go to now, or None; never starts anything (for ``/xdask/info``)."""
        if self.mode == "proxy":
            return self.endpoint
        if self._resolved and await embedded.probe_async(self._resolved):
            return self._resolved
        if self.mode == "auto":
            default_endpoint = str(config.get("endpoint")).rstrip("/")
            if await embedded.probe_async(default_endpoint):
                return default_endpoint
        return await embedded.local_endpoint_async()

    async def resolve(self) -> str:
        """The endpoint to forward to, starting the embedded server if this mode allows and none runs.

        Raises
        ------
        EmbeddedServerError
            The embedded server could not start (answered as 503).
        """
        if self.mode == "proxy":
            return self.endpoint
        if self._resolved:
            return self._resolved
        if self._resolve_lock is None:
            self._resolve_lock = asyncio.Lock()
        async with self._resolve_lock:
            # Concurrent first requests wait for one resolution instead of probing (or starting) twice.
            if self._resolved:
                return self._resolved
            endpoint: str | None = None
            if self.mode == "auto":
                default_endpoint = str(config.get("endpoint")).rstrip("/")
                if await embedded.probe_async(default_endpoint):
                    endpoint = default_endpoint
            if endpoint is None:
                endpoint = await embedded.ensure_local_async()
            self._resolved = endpoint
            self.log.info("xdask: /%s/ now forwards to %s", PREFIX, endpoint)
            return endpoint

    async def start_local(self) -> str:
        """Start (or reuse) the embedded server and send the proxy there."""
        if self.mode == "proxy":
            raise ConflictError(
                f"XdaskExtension.endpoint is {self.endpoint}; set it to 'local' or 'auto' to use an embedded server",
                param="endpoint",
            )
        endpoint = await embedded.ensure_local_async()
        self._resolved = endpoint
        return endpoint

    async def stop_local(self) -> bool:
        """Stop the embedded server if this Jupyter server started it."""
        stopped = await embedded.stop_local_async()
        if stopped:
            self._resolved = None
        return stopped

    def forget(self, endpoint: str) -> bool:
        """A connection to ``endpoint`` failed: find the server again on the next request (not for a URL)."""
        if self.mode == "proxy":
            return False
        if self._resolved == endpoint:
            self._resolved = None
        return True

    async def stop_extension(self) -> None:
        """Jupyter is stopping: stop the embedded server if this process started it, close connections."""
        if embedded.started_here():
            self.log.info("xdask: stopping the embedded xdask-local this server started")
            await embedded.stop_local_async()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _XdaskHandlerMixin(ExtensionHandlerMixin):
    """What every ``/xdask/`` handler reads: the extension app and the URL prefix."""

    @property
    def xdask(self) -> XdaskExtension:
        return self.extensionapp  # type: ignore[return-value]

    def prefix(self, *parts: str) -> str:
        return url_path_join(self.base_url, PREFIX, *parts)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)  # type: ignore[attr-defined]
        self.finish(json.dumps(data))  # type: ignore[attr-defined]


class InfoHandler(_XdaskHandlerMixin, APIHandler):
    """``GET /xdask/info``: where /xdask/api goes, and whether it is up. Starts nothing."""

    @web.authenticated
    async def get(self) -> None:
        endpoint = await self.xdask.current_endpoint()
        # Outside proxy mode current_endpoint() only returns a server that answered.
        running = endpoint is not None and (self.xdask.mode != "proxy" or await embedded.probe_async(endpoint))
        self.write_json({
            "endpoint": endpoint,
            "mode": self.xdask.mode,
            "running": running,
            "embedded": embedded.started_here(),
            "dashboard": self.prefix("dashboard"),
            "version": xdask.__version__,
        })


class LocalHandler(_XdaskHandlerMixin, APIHandler):
    """``POST /xdask/local`` starts (or reuses) the embedded xdask-local; ``DELETE`` stops it."""

    @web.authenticated
    async def post(self) -> None:
        try:
            endpoint = await self.xdask.start_local()
        except XdaskError as err:
            self.set_status(err.status)
            self.finish(json.dumps(err.to_dict()))
            return
        self.write_json({"endpoint": endpoint, "mode": self.xdask.mode, "running": True,
                         "embedded": embedded.started_here()})

    @web.authenticated
    async def delete(self) -> None:
        self.write_json({"stopped": await self.xdask.stop_local()})


class _XdaskProxyHandler(_XdaskHandlerMixin, ProxyMixin):
    """The proxy wired to the extension app's endpoint resolution and shared client."""

    async def upstream_endpoint(self) -> str:
        return await self.xdask.resolve()

    def forget_endpoint(self, endpoint: str) -> bool:
        return self.xdask.forget(endpoint)

    def http_client(self) -> httpx.AsyncClient:
        return self.xdask.http_client()

    def api_key(self) -> str | None:
        return self.xdask.api_key or None

    def path_map(self) -> dict[str, str]:
        return {"/dashboard": self.prefix("dashboard"), "/": self.prefix("api")}


class ApiProxyHandler(_XdaskProxyHandler, APIHandler):
    """``/xdask/api/<path>``: the xdask HTTP API (OpenAI ``/v1/*``, ``/status``, ...), any method."""

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        # APIHandler forces application/json; keep what the upstream server said (SSE, text).
        kwargs.setdefault("set_content_type", self._headers.get("Content-Type") or "application/json")
        return super().finish(*args, **kwargs)

    def _upstream_path(self) -> str:
        # The raw path, not Tornado's decoded argument: a %2F in a model uid must stay encoded.
        return "/" + self.request.path[len(self.prefix("api")):].lstrip("/")

    @web.authenticated
    async def _forward(self, _path: str) -> None:
        await self.proxy(self._upstream_path())

    # Every method is relayed as is: the xdask server decides which it allows (405 otherwise).
    get = post = put = patch = delete = _forward


class DashboardProxyHandler(_XdaskProxyHandler, JupyterHandler):
    """``/xdask/dashboard<rest>``: the xdask server's dashboard page and its data URLs.

    A JupyterHandler, not an APIHandler: the page is HTML with scripts, which
    APIHandler's ``default-src 'none'`` policy would block.
    """

    def _upstream_path(self) -> str:
        return "/dashboard" + self.request.path[len(self.prefix("dashboard")):]

    @web.authenticated
    async def _forward(self, _rest: str) -> None:
        await self.proxy(self._upstream_path())

    get = post = _forward
