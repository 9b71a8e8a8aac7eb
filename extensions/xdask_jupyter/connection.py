"""The notebook's current xdask server: ``connect()`` picks it, widgets and magics use it.

One connection per kernel, so that a ``%xdask connect`` or ``xj.connect(url)``
at the top of a notebook applies to every widget and magic below it without
passing a client around. Each widget and magic still takes ``client=`` for
notebooks that talk to several servers.

Examples
--------
>>> import xdask.jupyter as xj
>>> client = xj.connect("http://127.0.0.1:9997")   # doctest: +SKIP
>>> xj.current_client() is client                   # doctest: +SKIP
True
>>> xj.connect("local")                             # doctest: +SKIP
<xdask.client.Client object at ...>
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx

from xdask import config
from xdask.client import Client
from xdask.errors import UpstreamUnavailableError

#: The current connection of this kernel (None until the first connect).
_current: Client | None = None
#: connect() may run from a widget's thread while a cell runs another.
_lock = threading.Lock()


def server_status(endpoint: str, timeout: float | None = None) -> dict[str, Any]:
    """``GET {endpoint}/status``; raises a clear error when nothing answers.

    Timeout: ``xdask.jupyter.probe-timeout`` seconds. A status is checked on
    connect so that a wrong URL fails at ``connect``, not later in a widget's
    background thread where nobody reads the traceback.

    Raises
    ------
    UpstreamUnavailableError
        Nothing answers, or the answer is not an xdask status.
    """
    endpoint = endpoint.rstrip("/")
    timeout = float(config.get("jupyter.probe-timeout", 2)) if timeout is None else timeout
    try:
        resp = httpx.get(f"{endpoint}/status", timeout=timeout)
    except httpx.HTTPError as exc:
        raise UpstreamUnavailableError(
            f"No xdask server answers at {endpoint} ({type(exc).__name__}: {exc or 'no answer'}); "
            "start one with `xdask-local`, or connect to 'local' for an embedded one"
        ) from None
    if resp.status_code != 200:
        raise UpstreamUnavailableError(f"{endpoint}/status answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return dict(resp.json())
    except ValueError:
        raise UpstreamUnavailableError(f"{endpoint}/status did not answer JSON; is it an xdask server?") from None


def _answers(endpoint: str) -> bool:
    try:
        server_status(endpoint)
    except UpstreamUnavailableError:
        return False
    return True


def resolve_endpoint(target: str | None = None) -> str:
    """The endpoint ``connect(target)`` would use (may start the embedded server).

    ``target``: a URL; ``"local"`` (the shared embedded xdask-local, started if
    none runs); ``None`` or ``"auto"``: ``XDASK_ENDPOINT`` if set, else a
    running embedded server, else xdask's default endpoint if it answers, else
    a new embedded server. The order prefers what already runs, so a notebook
    never starts a second server (with second copies of its models) by accident.
    """
    # Imported here: the embedded module reads state files and may start processes;
    # a notebook that names its server never needs it.
    if target is not None and target.strip().lower() not in ("", "auto"):
        target = target.strip()
        if target.lower() == "local":
            from xdask_jupyter import embedded

            return embedded.ensure_local()
        if "://" not in target:
            target = f"http://{target}"
        return target.rstrip("/")
    env = os.environ.get("XDASK_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from xdask_jupyter import embedded

    running = embedded.local_endpoint()
    if running:
        return running.rstrip("/")
    default = str(config.get("endpoint")).rstrip("/")
    if _answers(default):
        return default
    return embedded.ensure_local()


def connect(target: str | None = None, api_key: str | None = None) -> Client:
    """Make ``target`` the notebook's current xdask server and return its client.

    See :func:`resolve_endpoint` for what ``target`` may be. The server's
    ``/status`` must answer, so a wrong address fails here with a clear message.
    The previous client is left open: widgets made with it keep working.
    ``api_key`` is for a server with auth on (default: ``XDASK_API_KEY``,
    which a Jupyter server configured with ``c.XdaskExtension.api_key`` hands
    its kernels, else the token ``xdask login`` stored for the endpoint).

    Raises
    ------
    UpstreamUnavailableError
        The server does not answer ``/status``.
    EmbeddedServerError
        ``"local"`` was asked for (or chosen) and the embedded server failed to start.
    """
    global _current
    endpoint = resolve_endpoint(target)
    server_status(endpoint)
    client = Client(endpoint, api_key=api_key)
    with _lock:
        _current = client
    return client


def current_client() -> Client:
    """The current connection, made with :func:`connect`'s defaults on first use."""
    with _lock:
        client = _current
    return client if client is not None else connect()


def client_or_current(client: Client | None) -> Client:
    """``client`` if given, else :func:`current_client` (the rule of every widget and magic)."""
    return client if client is not None else current_client()


__all__ = ["client_or_current", "connect", "current_client", "resolve_endpoint", "server_status"]
