"""Forward a Jupyter request to the xdask server: the reverse proxy behind ``/xdask/api`` and ``/xdask/dashboard``.

Why a proxy at all: JupyterLab (and a browser behind JupyterHub) can only
reach the Jupyter server's origin, and Jupyter's login then guards xdask too.
What it keeps: the method, path, query, body, the upstream status code and
body unchanged (OpenAI-style error bodies must reach OpenAI clients as they
are), and streaming: an SSE answer is relayed chunk by chunk as it arrives,
and a client that goes away closes the upstream request (so the model stops).
What it drops: Jupyter's credentials (``Authorization``, cookies, XSRF token)
never reach the xdask server; a caller's own xdask key travels as
``X-Xdask-Authorization`` and is forwarded as ``Authorization``, and without
one the extension's own key (``c.XdaskExtension.api_key``) is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from tornado import iostream

from xdask import config
from xdask.errors import UpstreamUnavailableError, XdaskError

logger = logging.getLogger(__name__)

#: The header a caller uses for the xdask server's own credentials (Jupyter owns ``Authorization``).
XDASK_AUTH_HEADER = "X-Xdask-Authorization"

#: Hop-by-hop headers (RFC 9110 7.6.1) and framing the two connections each set for themselves.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "host",
})

#: Request headers that belong to Jupyter, not to the xdask server.
_JUPYTER_ONLY = frozenset({"authorization", "cookie", "x-xsrftoken", "x-csrftoken", XDASK_AUTH_HEADER.lower()})

#: Response headers the proxy must not copy: Jupyter sets its own server/date, and an upstream cookie
#: would land on Jupyter's origin.
_RESPONSE_DROP = frozenset({"server", "date", "set-cookie"})


def client_timeout() -> httpx.Timeout:
    """Connect quickly or fail (502); wait long between bytes (a model may think before its first token)."""
    connect = float(config.get("jupyter.proxy-connect-timeout"))
    read = float(config.get("jupyter.proxy-read-timeout"))
    return httpx.Timeout(read, connect=connect)


def make_client() -> httpx.AsyncClient:
    """The one upstream client of a Jupyter server: pooled connections, no limit on concurrent streams."""
    return httpx.AsyncClient(
        timeout=client_timeout(),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        follow_redirects=False,
    )


def bearer(credential: str) -> str:
    """An ``Authorization`` value for a key or token given bare (``sk-...``) or with its scheme."""
    credential = credential.strip()
    return credential if " " in credential else f"Bearer {credential}"


def upstream_headers(incoming: Any, api_key: str | None = None) -> dict[str, str]:
    """The request headers to send upstream: Jupyter's credentials out, the xdask credential in.

    The caller's own ``X-Xdask-Authorization`` wins; without one, the
    extension's ``api_key`` (``c.XdaskExtension.api_key`` / ``XDASK_API_KEY``) is sent.
    """
    out: dict[str, str] = {}
    for name, value in incoming.get_all():
        low = name.lower()
        if low in _HOP_BY_HOP or low in _JUPYTER_ONLY or low == "accept-encoding":
            continue
        out[name] = value if name not in out else f"{out[name]}, {value}"
    key = incoming.get(XDASK_AUTH_HEADER) or api_key
    if key:
        out["Authorization"] = bearer(key)
    return out


def rewrite_location(location: str, upstream: str, path_map: dict[str, str]) -> str:
    """Point an upstream redirect back into the proxy.

    A relative Location (``dashboard/``) already resolves against the proxied
    URL and is kept. A rooted or absolute one at the upstream server would
    leave the proxy, so its path is mapped through ``path_map`` (upstream
    path prefix → proxied prefix, longest first); other hosts are kept.
    """
    parts = urlsplit(location)
    up = urlsplit(upstream)
    if parts.scheme or parts.netloc:
        if (parts.scheme, parts.netloc) != (up.scheme, up.netloc):
            return location
    elif not location.startswith("/"):
        return location
    path = parts.path or "/"
    base = up.path.rstrip("/")
    if base and path.startswith(base):
        path = path[len(base):] or "/"
    for src in sorted(path_map, key=len, reverse=True):
        stem = src.rstrip("/")
        if path == src or path.startswith(stem + "/"):
            mapped = path_map[src].rstrip("/") + path[len(stem):]
            return urlunsplit(("", "", mapped, parts.query, parts.fragment))
    return location


class ProxyMixin:
    """Tornado handler mixin: relay this request to an xdask server.

    Subclasses (with a Jupyter handler base) provide :meth:`upstream_endpoint`
    and :meth:`path_map`, and may override :meth:`forget_endpoint` to pick a
    new server after a failed connection (the embedded server was restarted).
    """

    #: Set by on_connection_close: the client left, stop relaying.
    _client_gone: bool = False
    _relay_task: asyncio.Task[None] | None = None

    async def upstream_endpoint(self) -> str:
        """The xdask server to forward to (may start one); raises XdaskError if none can be had."""
        raise NotImplementedError

    def forget_endpoint(self, endpoint: str) -> bool:
        """Drop a cached endpoint that refused a connection; True if another one may be tried."""
        return False

    def path_map(self) -> dict[str, str]:
        """Upstream path prefix → proxied path prefix, for redirects (see :func:`rewrite_location`)."""
        return {}

    def http_client(self) -> httpx.AsyncClient:
        """The shared upstream client."""
        raise NotImplementedError

    def api_key(self) -> str | None:
        """The credential sent upstream when the caller gives none (None: send nothing)."""
        return None

    def write_xdask_error(self, err: XdaskError) -> None:
        """Answer with an OpenAI-style error body and the error's status."""
        self.clear_header("Location")  # type: ignore[attr-defined]
        self.set_status(err.status)  # type: ignore[attr-defined]
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps(err.to_dict()))  # type: ignore[attr-defined]

    def on_connection_close(self) -> None:
        """The client went away: cancel the relay, which closes the upstream request."""
        self._client_gone = True
        if self._relay_task is not None and not self._relay_task.done():
            self._relay_task.cancel()
        super().on_connection_close()  # type: ignore[misc]

    async def proxy(self, upstream_path: str) -> None:
        """Forward this request to ``{endpoint}{upstream_path}`` and relay the answer."""
        self._relay_task = asyncio.ensure_future(self._relay(upstream_path))
        try:
            await self._relay_task
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            logger.debug("client left %s; upstream request closed", upstream_path)

    async def _relay(self, upstream_path: str) -> None:
        request = self.request  # type: ignore[attr-defined]
        headers = upstream_headers(request.headers, self.api_key())
        body = request.body or None
        tried: set[str] = set()
        while True:
            try:
                endpoint = (await self.upstream_endpoint()).rstrip("/")
            except XdaskError as err:
                self.write_xdask_error(err)
                return
            query = f"?{request.query}" if request.query else ""
            url = f"{endpoint}{upstream_path}{query}"
            client = self.http_client()
            try:
                upstream = await client.send(client.build_request(request.method, url, headers=headers, content=body),
                                             stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing reached the server, so trying another one (a restarted embedded server) is safe.
                tried.add(endpoint)
                if self.forget_endpoint(endpoint) and len(tried) < 2:
                    continue
                self.write_xdask_error(UpstreamUnavailableError(f"cannot reach the xdask server at {endpoint}: {exc}"))
                return
            except httpx.HTTPError as exc:
                self.write_xdask_error(UpstreamUnavailableError(f"the xdask server at {endpoint} failed: {exc}"))
                return
            try:
                await self._relay_response(upstream, endpoint)
            finally:
                await upstream.aclose()
            return

    async def _relay_response(self, upstream: httpx.Response, endpoint: str) -> None:
        self.set_status(upstream.status_code, upstream.reason_phrase or None)  # type: ignore[attr-defined]
        seen: set[str] = set()
        for name, value in upstream.headers.multi_items():
            low = name.lower()
            if low in _HOP_BY_HOP or low in _RESPONSE_DROP:
                continue
            if low == "location":
                value = rewrite_location(value, endpoint, self.path_map())
            if low in seen:
                self.add_header(name, value)  # type: ignore[attr-defined]
            else:
                self.set_header(name, value)  # type: ignore[attr-defined]
                seen.add(low)
        content_type = upstream.headers.get("content-type", "")
        streaming = "text/event-stream" in content_type or "content-length" not in upstream.headers
        if not streaming:
            try:
                data = await upstream.aread()
            except httpx.HTTPError as exc:
                self.write_xdask_error(UpstreamUnavailableError(f"the xdask server at {endpoint} failed: {exc}"))
                return
            self.finish(data or None)  # type: ignore[attr-defined]
            return
        # Each token is a small write: with Nagle's algorithm on, every write after the first waits for
        # the client's (delayed, ~40 ms) ACK, which cost 44 ms of time to first token and half the
        # tokens/s at concurrency 8 in tests/benchmarks/bench_jupyter_proxy.py.
        stream = getattr(self.request.connection, "stream", None)  # type: ignore[attr-defined]
        if stream is not None:
            stream.set_nodelay(True)
        try:
            # Headers go out first, so an SSE client sees the stream open before the first token.
            await self.flush()  # type: ignore[attr-defined]
            async for chunk in upstream.aiter_raw():
                self.write(chunk)  # type: ignore[attr-defined]
                await self.flush()  # type: ignore[attr-defined]
        except iostream.StreamClosedError:
            self._client_gone = True
            return
        except httpx.HTTPError as exc:
            # The status line is already sent: all that is left is to end the stream early.
            logger.warning("upstream stream from %s broke off: %s", endpoint, exc)
        self.finish()  # type: ignore[attr-defined]
