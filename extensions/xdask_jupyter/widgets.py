"""ipywidgets for xdask: a model launcher, a live table of running models, a chat box, the dashboard.

Every widget talks to the server over HTTP with an :class:`xdask.Client`
(``client=``, else the notebook's current connection, see
:mod:`xdask_jupyter.connection`). Anything that may take longer than one quick
HTTP call (a launch, a terminate, a streamed answer, the periodic refresh)
runs in a daemon thread, so the kernel stays free to run cells; the widget
shows progress and errors itself, because an exception in a background thread
reaches nobody.

Examples
--------
>>> import xdask.jupyter as xj                 # doctest: +SKIP
>>> xj.connect("local")                        # doctest: +SKIP
>>> xj.Launcher()                              # doctest: +SKIP
>>> xj.ModelTable()                            # doctest: +SKIP
>>> xj.ChatWidget(model_uid="gemma-3-270m")    # doctest: +SKIP
>>> xj.dashboard()                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import html
import os
import shlex
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, TypeVar

import ipywidgets as widgets
from IPython.display import IFrame

from xdask.client import Client, ModelHandle
from xdask.errors import NotFoundError, XdaskError
from xdask_jupyter.connection import client_or_current

T = TypeVar("T")

_RED = "#c62828"
_GREY = "#666"
_WIDE = {"description_width": "110px"}


def _in_thread(fn: Callable[..., T], *args: Any, name: str = "xdask-widget", **kwargs: Any) -> Future[T]:
    """Run ``fn`` in a new daemon thread; its result or exception lands in the returned future.

    Daemon threads rather than a ThreadPoolExecutor: the executor's threads are
    joined at interpreter exit, so a kernel shut down during a 30-minute model
    load would wait for it.
    """
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def error_text(exc: BaseException) -> str:
    """A one-line message for a user: the server's message and code for xdask errors, no traceback."""
    if isinstance(exc, XdaskError):
        code = f" [{exc.code}]" if exc.code else ""
        return f"{exc.message}{code}"
    format_message = getattr(exc, "format_message", None)  # click's parameter errors
    if callable(format_message):
        return str(format_message())
    return f"{type(exc).__name__}: {exc}"


def chat_deltas(chunks: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The non-empty ``delta.content`` pieces of streamed chat chunks, in order (widgets and ``%%chat``)."""
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def _error_html(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else error_text(exc)
    return f'<div style="color:{_RED};white-space:pre-wrap"><b>Error:</b> {html.escape(text, quote=False)}</div>'


def _small(text: str, color: str = _GREY) -> str:
    return f'<span style="color:{color};font-size:90%">{text}</span>'


def dashboard_url(client: Client | None = None, *, proxy: bool = False, base_url: str | None = None) -> str:
    """The dashboard's URL: ``{endpoint}/dashboard``, or the Jupyter server extension's proxy of it.

    ``proxy=True`` is for a browser that cannot reach the xdask server (remote
    Jupyter): ``<base_url>xdask/dashboard`` on the Jupyter server itself.
    ``base_url`` defaults to ``JUPYTERHUB_SERVICE_PREFIX`` (set under
    JupyterHub), else ``/``.
    """
    if proxy:
        base = base_url if base_url is not None else os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        return base.rstrip("/") + "/xdask/dashboard"
    return f"{client_or_current(client).endpoint}/dashboard"


def dashboard(client: Client | None = None, height: int = 800, proxy: bool = False,
              base_url: str | None = None) -> IFrame:
    """The xdask dashboard in an IFrame (display it, or make it a cell's last expression).

    See :func:`dashboard_url` for ``proxy`` and ``base_url``.
    """
    return IFrame(dashboard_url(client, proxy=proxy, base_url=base_url), width="100%", height=height)


def _size_label(size: Any) -> str:
    return f"{str(size).replace('_', '.')} B"


@contextlib.contextmanager
def _flag(owner: Any, name: str) -> Iterator[None]:
    setattr(owner, name, True)
    try:
        yield
    finally:
        setattr(owner, name, False)


def _set_choices(dropdown: widgets.Dropdown, options: list[tuple[str, Any]]) -> None:
    """New options, keeping the current value when it is still offered (else the first option)."""
    old = dropdown.value
    values = [value for _, value in options]
    # Not under hold_trait_notifications: the value would be validated against the old options.
    dropdown.options = options
    dropdown.value = old if old in values else (values[0] if values else None)


# -- Launcher -------------------------------------------------------------------------------------------------


class Launcher(widgets.VBox):
    """Launch a model from dropdowns filled by the server: type, family, engine, format, size, quantization.

    Engine, format, size and quantization cascade from ``query_engines(family)``:
    only combinations that can run on the cluster are offered; the others are
    listed with the server's reason under the dropdowns. The Launch button
    launches in a background thread and shows the elapsed time and the
    replicas ready (polled with ``describe_model``), then the uid, or the
    server's error message in red.

    Parameters
    ----------
    client
        Server to launch on (default: :func:`xdask_jupyter.connection.current_client`).
    proxy
        Link the dashboard through the Jupyter server (see :func:`dashboard_url`).
    poll_interval
        Seconds between progress polls while a launch runs.

    Attributes
    ----------
    model_type, family, engine, model_format, size, quantization, n_gpu, worker : ipywidgets.Dropdown
    replica : ipywidgets.BoundedIntText
    model_uid, engine_options : ipywidgets.Text
        ``engine_options`` holds ``KEY=VALUE`` pairs (``n_parallel=4 n_ctx=4096``), as ``xdask launch --kwarg``.
    launch_button : ipywidgets.Button
    progress : ipywidgets.IntProgress
    status, error, unavailable, links : ipywidgets.HTML
    last_launch : concurrent.futures.Future[str] | None
        The future of the latest launch (its uid, or the server's error).

    Examples
    --------
    >>> launcher = Launcher()                               # doctest: +SKIP
    >>> launcher.family.value = "gemma-3-270m"              # doctest: +SKIP
    >>> launcher.launch().result()                          # doctest: +SKIP
    'gemma-3-270m'
    """

    def __init__(self, client: Client | None = None, *, proxy: bool = False, poll_interval: float = 0.5):
        from xdask.registry.families import MODEL_TYPES

        self.client = client_or_current(client)
        self.poll_interval = poll_interval
        self.last_launch: Future[str] | None = None
        self._matrix: dict[str, list[dict[str, Any]]] = {}
        self._filling = False

        wide = widgets.Layout(width="420px")
        self.model_type = widgets.Dropdown(options=list(MODEL_TYPES), value="LLM", description="Model type",
                                           style=_WIDE, layout=wide)
        self.family = widgets.Dropdown(description="Family", style=_WIDE, layout=wide)
        self.engine = widgets.Dropdown(description="Engine", style=_WIDE, layout=wide)
        self.model_format = widgets.Dropdown(description="Format", style=_WIDE, layout=wide)
        self.size = widgets.Dropdown(description="Size", style=_WIDE, layout=wide)
        self.quantization = widgets.Dropdown(description="Quantization", style=_WIDE, layout=wide)
        self.n_gpu = widgets.Dropdown(options=[("auto", "auto"), ("CPU (0)", 0), ("1", 1)], value="auto",
                                      description="GPUs/replica", style=_WIDE, layout=wide)
        self.replica = widgets.BoundedIntText(value=1, min=1, max=1024, description="Replicas", style=_WIDE,
                                              layout=wide)
        # "" for any worker: a Dropdown whose value is None shows no selection at all.
        self.worker = widgets.Dropdown(options=[("any", "")], value="", description="Worker", style=_WIDE,
                                       layout=wide)
        self.model_uid = widgets.Text(placeholder="default: the family name", description="Model uid",
                                      style=_WIDE, layout=wide)
        self.engine_options = widgets.Text(placeholder="KEY=VALUE ..., e.g. n_parallel=4 n_ctx=4096",
                                           description="Engine options", style=_WIDE, layout=wide)
        self.launch_button = widgets.Button(description="Launch", button_style="primary", icon="rocket")
        self.refresh_button = widgets.Button(description="Reload choices", icon="refresh")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="200px",
                                                                                         visibility="hidden"))
        self.status = widgets.HTML()
        self.error = widgets.HTML()
        self.unavailable = widgets.HTML()
        url = html.escape(dashboard_url(self.client, proxy=proxy))
        self.links = widgets.HTML(_small(f'<a href="{url}" target="_blank">Open the xdask dashboard</a> '
                                         f'({html.escape(self.client.endpoint)})'))

        self.model_type.observe(lambda _: self._load_families(), "value")
        self.family.observe(lambda _: self._on_change("family"), "value")
        self.engine.observe(lambda _: self._on_change("engine"), "value")
        self.model_format.observe(lambda _: self._on_change("model_format"), "value")
        self.size.observe(lambda _: self._on_change("size"), "value")
        self.launch_button.on_click(lambda _: self._on_click())
        self.refresh_button.on_click(lambda _: self.reload())

        super().__init__([
            widgets.HTML("<b>Launch a model</b>"),
            self.model_type, self.family, self.engine, self.model_format, self.size, self.quantization,
            self.unavailable,
            self.n_gpu, self.replica, self.worker, self.model_uid, self.engine_options,
            widgets.HBox([self.launch_button, self.refresh_button, self.progress]),
            self.status, self.error, self.links,
        ])
        self.reload()

    def close(self) -> None:
        """Close this widget and the widgets inside it (a running launch goes on; its future stays valid)."""
        _close_tree(self)

    # -- choices ---------------------------------------------------------------

    def reload(self) -> None:
        """Fetch families, the engine matrix and the workers again (e.g. after a worker joined)."""
        self.error.value = ""
        self._load_workers()
        self._load_families()

    def _load_workers(self) -> None:
        try:
            workers = self.client.list_workers()
        except (XdaskError, OSError) as exc:
            self.error.value = _error_html(exc)
            return
        most = max((int((w.get("gpus") or {}).get("total") or 0) for w in workers), default=0)
        # At least "1": on a CPU-only cluster the server's refusal says why, which teaches more than a
        # missing option.
        _set_choices(self.n_gpu, [("auto", "auto"), ("CPU (0)", 0)] + [(str(n), n) for n in range(1, max(most, 1) + 1)])
        _set_choices(self.worker, [("any", "")] + [
            (f"{w['address']} ({w.get('name', '')})", w["address"]) for w in workers if w.get("address")
        ])

    def _load_families(self) -> None:
        try:
            items = self.client.list_model_registrations(self.model_type.value, detailed=True)
        except (XdaskError, OSError) as exc:
            items = []
            self.error.value = _error_html(exc)
        with _flag(self, "_filling"):
            _set_choices(self.family, [(item["model_name"], item["model_name"]) for item in items])
        self._load_matrix()

    def _load_matrix(self) -> None:
        self._matrix = {}
        if self.family.value:
            try:
                self._matrix = self.client.query_engines(self.family.value)
            except (XdaskError, OSError) as exc:
                self.error.value = _error_html(exc)
        self._show_unavailable()
        self._fill_below("family")

    def _on_change(self, level: str) -> None:
        if self._filling:
            return
        if level == "family":
            self._load_matrix()
        else:
            self._fill_below(level)

    def _specs(self, upto: str) -> list[dict[str, Any]]:
        """The available specs that match the dropdowns above ``upto``."""
        order = ["engine", "model_format", "size"]
        keys = {"model_format": "model_format", "size": "model_size_in_billions"}
        specs = [s for s in self._matrix.get(self.engine.value or "", []) if s.get("available")]
        for level in order[1:order.index(upto) if upto in order else len(order)]:
            value = getattr(self, level).value
            specs = [s for s in specs if s.get(keys[level]) == value]
        return specs

    def _choices(self, level: str) -> list[tuple[str, Any]]:
        if level == "engine":
            return [(name, name) for name, specs in self._matrix.items() if any(s.get("available") for s in specs)]
        seen: dict[Any, str] = {}
        for spec in self._specs(level):
            if level == "model_format":
                seen.setdefault(spec["model_format"], spec["model_format"])
            elif level == "size":
                size = spec["model_size_in_billions"]
                seen.setdefault(size, _size_label(size))
            else:
                for quant in spec.get("quantizations") or []:
                    seen.setdefault(quant, quant)
        return [(label, value) for value, label in seen.items()]

    def _fill_below(self, level: str) -> None:
        """Refill every dropdown below ``level`` (one pass, observers muted: no cascade of HTTP calls)."""
        levels = ["family", "engine", "model_format", "size", "quantization"]
        with _flag(self, "_filling"):
            for below in levels[levels.index(level) + 1:]:
                _set_choices(getattr(self, below), self._choices(below))
        self.launch_button.disabled = not (self.family.value and self.engine.value) or self.running

    def _show_unavailable(self) -> None:
        lines = [
            f"{html.escape(engine)} {html.escape(str(s.get('model_format')))} "
            f"{html.escape(_size_label(s.get('model_size_in_billions')))}: {html.escape(str(s.get('reason') or '?'))}"
            for engine, specs in self._matrix.items() for s in specs if not s.get("available")
        ]
        if not lines:
            self.unavailable.value = ""
            return
        if not self._choices("engine"):
            self.error.value = _error_html(f"No engine can run {self.family.value} on this cluster (see below)")
        self.unavailable.value = _small(
            f"<details><summary>{len(lines)} combination(s) cannot run here</summary>{'<br>'.join(lines)}</details>"
        )

    # -- launching -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a launch started here has not finished."""
        return self.last_launch is not None and not self.last_launch.done()

    def payload(self) -> dict[str, Any]:
        """``Client.launch_model``'s keyword arguments for the current choices (parsed as ``xdask launch``'s).

        Raises ``click.BadParameter`` for malformed engine options.
        """
        from xdask.cli import launch_payload

        n_gpu = self.n_gpu.value
        return launch_payload(
            model_name=self.family.value, model_type=self.model_type.value, model_engine=self.engine.value,
            model_format=self.model_format.value, size_in_billions=self.size.value,
            quantization=self.quantization.value, model_uid=self.model_uid.value.strip() or None,
            n_gpu=None if n_gpu == "auto" else str(n_gpu), replica=int(self.replica.value),
            worker_address=self.worker.value or None, kwargs=shlex.split(self.engine_options.value),
        )

    def _on_click(self) -> None:
        if not self.running:
            self.launch()

    def launch(self) -> Future[str]:
        """Launch with the current choices in a background thread; what the Launch button does.

        Returns the future of the model's uid (also ``self.last_launch``); a
        failed launch sets the future's exception and shows its message.
        """
        if self.running:
            raise RuntimeError("a launch from this launcher is still running")
        self.error.value = ""
        try:
            if not self.family.value:
                raise ValueError("choose a model family first")
            payload = self.payload()
        except Exception as exc:  # noqa: BLE001 - any bad choice is shown and handed back in the future
            future: Future[str] = Future()
            future.set_exception(exc)
            self.last_launch = future
            self.error.value = _error_html(exc)
            return future
        self.launch_button.disabled = True
        self.progress.max = int(payload.get("replica") or 1)
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.progress.layout.visibility = "visible"
        self.last_launch = _in_thread(self._run_launch, payload, name="xdask-launch")
        return self.last_launch

    def _run_launch(self, payload: dict[str, Any]) -> str:
        started = time.monotonic()
        uid = payload.get("model_uid") or payload["model_name"]
        n = int(payload.get("replica") or 1)
        try:
            # A uid that already runs gets a 409 at once; polling it would show the old model's replicas.
            poll = uid not in self.client.list_models()
            request = _in_thread(self.client.launch_model, name="xdask-launch-request", **payload)
            ready, state = 0, "placing"
            while True:
                self.status.value = _small(f"launching {html.escape(uid)}… {time.monotonic() - started:.0f} s, "
                                           f"replicas ready {ready}/{n} ({html.escape(state)})")
                done, _ = wait_futures([request], timeout=self.poll_interval)
                if done:
                    break
                if poll:
                    with contextlib.suppress(XdaskError, OSError):
                        desc = self.client.describe_model(uid)
                        replicas = desc.get("replicas") or []
                        ready = sum(1 for r in replicas if r.get("state") == "ready")
                        state = str(desc.get("state") or state)
                        self.progress.value = min(ready, n)
            uid = request.result()
            engine = ""
            with contextlib.suppress(XdaskError, OSError):
                engine = str(self.client.describe_model(uid).get("model_engine") or "")
        except BaseException as exc:
            self.progress.bar_style = "danger"
            self.status.value = _small(f"launch failed after {time.monotonic() - started:.1f} s", _RED)
            self.error.value = _error_html(exc)
            raise
        finally:
            self.launch_button.disabled = False
        self.progress.value = n
        self.progress.bar_style = "success"
        # The uid in plain text, not its own element: a page search for the uid should find the table's cell.
        self.status.value = (f"✔ {html.escape(uid)} ready in {time.monotonic() - started:.1f} s"
                             + (f" on {html.escape(engine)}" if engine else ""))
        return uid


# -- ModelTable -----------------------------------------------------------------------------------------------


class ModelRow:
    """The widgets of one running model in a :class:`ModelTable` (one cell per column)."""

    def __init__(self, uid: str, on_terminate: Callable[[str], Any]):
        cell = widgets.Layout(overflow="hidden")
        self.uid = uid
        self.uid_label = widgets.HTML(f"<b>{html.escape(uid)}</b>", layout=cell)
        self.name = widgets.HTML(layout=cell)
        self.engine = widgets.HTML(layout=cell)
        self.state = widgets.HTML(layout=cell)
        self.replicas = widgets.HTML(layout=cell)
        self.load = widgets.HTML(layout=cell)
        self.terminate_button = widgets.Button(description="Terminate", button_style="danger", icon="stop",
                                               tooltip=f"Terminate {uid}", layout=widgets.Layout(width="110px"))
        self.terminate_button.on_click(lambda _: on_terminate(uid))
        self.description: dict[str, Any] = {}

    @property
    def cells(self) -> list[widgets.Widget]:
        return [self.uid_label, self.name, self.engine, self.state,
                self.replicas, self.load, self.terminate_button]

    def update(self, desc: dict[str, Any]) -> None:
        """Show a ``describe_model`` answer; traitlets send only the values that changed."""
        self.description = desc
        self.name.value = html.escape(str(desc.get("model_name", "")))
        self.engine.value = html.escape(str(desc.get("model_engine", "")))
        state = str(desc.get("state", ""))
        color = {"ready": "#2e7d32", "failed": _RED, "lost": _RED}.get(state, "#ef6c00")
        self.state.value = f'<span style="color:{color}">{html.escape(state)}</span>'
        replicas, loads = [], []
        for r in desc.get("replicas") or []:
            gpus = r.get("gpu_idx") or []
            where = f"GPU {','.join(map(str, gpus))}" if gpus else "CPU"
            error = f' <span style="color:{_RED}">{html.escape(str(r["error"]))}</span>' if r.get("error") else ""
            replicas.append(f"#{r.get('replica_id')} {html.escape(str(r.get('address')))} {where} "
                            f"{html.escape(str(r.get('state')))}{error}")
            load = r.get("load")
            load = load if isinstance(load, dict) else {}
            # None while the replica loads: shown as "-", not "None".
            outstanding, in_flight = (load.get(k) for k in ("outstanding", "in_flight"))
            loads.append(f"#{r.get('replica_id')} {'-' if outstanding is None else outstanding} / "
                         f"{'-' if in_flight is None else in_flight}")
        self.replicas.value = f'<div style="font-family:monospace;font-size:90%">{"<br>".join(replicas)}</div>'
        self.load.value = f'<div style="font-family:monospace;font-size:90%">{"<br>".join(loads)}</div>'


class ModelTable(widgets.VBox):
    """Running models, refreshed every ``refresh_interval`` seconds, with a Terminate button each.

    Columns: uid, family, engine, state, replicas (worker, GPU indices, state),
    load per replica: requests outstanding (sent by the server, not yet
    answered) / in flight (running in the engine). A daemon thread refreshes it until :meth:`close` (or
    :meth:`stop`); refresh errors show in the status line.

    Parameters
    ----------
    client
        Server to watch (default: the current connection).
    refresh_interval
        Seconds between refreshes; ``None`` or ``0``: only :meth:`refresh` and the Refresh button.

    Attributes
    ----------
    rows : dict[str, ModelRow]
        The shown models by uid; ``rows[uid].terminate_button``.
    pending : dict[str, concurrent.futures.Future[None]]
        Terminations in progress (and finished ones) by uid.
    status : ipywidgets.HTML

    Examples
    --------
    >>> table = ModelTable(refresh_interval=2)   # doctest: +SKIP
    >>> table                                    # doctest: +SKIP
    >>> table.close()                            # doctest: +SKIP
    """

    _columns = ("UID", "Model", "Engine", "State", "Replicas (worker, placement, state)",
                "Load (outstanding / in flight)", "")

    def __init__(self, client: Client | None = None, refresh_interval: float | None = 2.0):
        self.client = client_or_current(client)
        self.refresh_interval = refresh_interval
        self.rows: dict[str, ModelRow] = {}
        self.pending: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = widgets.HTML()
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        self._header = [widgets.HTML(f"<b>{c}</b>") for c in self._columns]
        self.grid = widgets.GridBox(self._header, layout=widgets.Layout(
            grid_template_columns="minmax(100px,1fr) minmax(120px,1fr) 90px 80px minmax(280px,3fr) "
                                  "minmax(120px,1fr) 120px",
            grid_gap="2px 10px", align_items="center"))
        super().__init__([widgets.HBox([widgets.HTML("<b>Running models</b>"), self.refresh_button, self.status]),
                          self.grid])
        self.refresh()
        if refresh_interval:
            self.start()

    def start(self) -> None:
        """Start the refresh thread (the constructor does, unless ``refresh_interval`` is falsy)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        # A weak reference: the thread must not be what keeps a dropped table alive.
        self._thread = threading.Thread(target=_refresh_loop, args=(weakref.ref(self), self._stop,
                                                                     float(self.refresh_interval or 2.0)),
                                        name="xdask-model-table", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop refreshing and wait (up to ``timeout``) for the thread to end."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self) -> None:
        """Stop the refresh thread and close this widget and its children."""
        self.stop()
        _close_tree(self)

    def refresh(self) -> bool:
        """Fetch the models now and update the rows; False (and the error in the status line) on failure."""
        with self._lock:
            try:
                models = self.client.list_models()
                described = {}
                for uid in models:
                    try:
                        # The list lacks the replicas' load; describe has it.
                        described[uid] = self.client.describe_model(uid)
                    except NotFoundError:
                        continue
            except Exception as exc:  # noqa: BLE001 - a refresh thread must survive anything
                self.status.value = _error_html(f"refresh failed: {error_text(exc)}")
                return False
            changed = set(described) != set(self.rows)
            gone = [self.rows.pop(uid) for uid in list(self.rows) if uid not in described]
            for uid, desc in described.items():
                row = self.rows.get(uid)
                if row is None:
                    row = self.rows[uid] = ModelRow(uid, self.terminate)
                row.update(desc)
                if uid in self.pending and not self.pending[uid].done():
                    row.terminate_button.disabled = True
            if changed:
                self.grid.children = self._header + [cell for row in self.rows.values() for cell in row.cells]
            for row in gone:
                for cell in row.cells:
                    cell.close()
            self.status.value = _small(f"{len(described)} model(s), updated {time.strftime('%H:%M:%S')}")
            return True

    def terminate(self, uid: str) -> Future[None]:
        """Terminate ``uid`` in a background thread (what its Terminate button does), then refresh."""
        running = self.pending.get(uid)
        if running is not None and not running.done():
            return running
        row = self.rows.get(uid)
        if row is not None:
            row.terminate_button.disabled = True
            row.terminate_button.description = "Terminating…"

        def run() -> None:
            try:
                self.client.terminate_model(uid)
            except Exception as exc:
                self.status.value = _error_html(f"terminate {uid}: {error_text(exc)}")
                if row is not None:
                    row.terminate_button.disabled = False
                    row.terminate_button.description = "Terminate"
                raise
            self.refresh()

        future = self.pending[uid] = _in_thread(run, name="xdask-terminate")
        return future


def _close_tree(widget: widgets.Widget) -> None:
    """Close a widget and everything inside it (a Box's close leaves its children open)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    # Call the base close: ModelTable.close would recurse here.
    widgets.Widget.close(widget)


def _refresh_loop(ref: weakref.ref[ModelTable], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        table = ref()
        if table is None or table.comm is None:  # dropped, or closed without stop()
            return
        table.refresh()
        del table


# -- ChatWidget -----------------------------------------------------------------------------------------------


def _bubble(role: str, text: str) -> str:
    color = "#e3f2fd" if role == "user" else "#f5f5f5"
    return (f'<div style="background:{color};border-radius:6px;padding:4px 8px;margin:2px 0;'
            f'white-space:pre-wrap"><b>{html.escape(role)}:</b> {html.escape(text)}</div>')


class ChatWidget(widgets.VBox):
    """Chat with a running model: pick it, type, and watch the answer stream in; multi-turn.

    The answer's HTML is updated as chunks arrive (at most every
    ``update_interval`` seconds, so a fast model does not flood the
    frontend), from a background thread.

    Parameters
    ----------
    client
        Server (default: the current connection).
    model_uid
        Model to select (default: the first running model that can chat).
    system
        A system message sent before the conversation.
    max_tokens, temperature
        Sampling parameters of each request (``None``: the server's defaults).
    update_interval
        Least seconds between two updates of the streaming answer.

    Attributes
    ----------
    model : ipywidgets.Dropdown
    input : ipywidgets.Textarea
    send_button, clear_button, refresh_button : ipywidgets.Button
    transcript : ipywidgets.VBox
        One HTML per message.
    error, status : ipywidgets.HTML
    history : list[dict[str, str]]
        The conversation (``role``/``content``) sent with the next message.
    updates : int
        How many times the latest answer's HTML was updated while streaming.
    last_send : concurrent.futures.Future[str] | None

    Examples
    --------
    >>> chat = ChatWidget(model_uid="gemma")            # doctest: +SKIP
    >>> chat                                            # doctest: +SKIP
    >>> chat.send("Hello!").result()                    # doctest: +SKIP
    'Hello! How can I help you today?'
    """

    def __init__(self, client: Client | None = None, model_uid: str | None = None, *, system: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 update_interval: float = 0.05):
        self.client = client_or_current(client)
        self.system = system
        self.params: dict[str, Any] = {k: v for k, v in (("max_tokens", max_tokens),
                                                          ("temperature", temperature)) if v is not None}
        self.update_interval = update_interval
        self.history: list[dict[str, str]] = []
        self.updates = 0
        self.last_send: Future[str] | None = None
        self.model = widgets.Dropdown(description="Model", layout=widgets.Layout(width="360px"))
        self.refresh_button = widgets.Button(icon="refresh", tooltip="Reload the running models",
                                             layout=widgets.Layout(width="40px"))
        self.transcript = widgets.VBox(layout=widgets.Layout(max_height="480px", overflow="auto"))
        self.input = widgets.Textarea(placeholder="Type a message, then Send", rows=3,
                                      layout=widgets.Layout(width="100%"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.clear_button = widgets.Button(description="Clear", icon="trash")
        self.status = widgets.HTML()
        self.error = widgets.HTML()
        self.refresh_button.on_click(lambda _: self.refresh_models())
        self.send_button.on_click(lambda _: self._on_send())
        self.clear_button.on_click(lambda _: self.clear())
        super().__init__([widgets.HBox([self.model, self.refresh_button]), self.transcript, self.input,
                          widgets.HBox([self.send_button, self.clear_button, self.status]), self.error])
        self.refresh_models(select=model_uid)

    def refresh_models(self, select: str | None = None) -> None:
        """Reload the running models that can chat; keep (or pick ``select`` as) the selection."""
        self.error.value = ""
        try:
            models = self.client.list_models()
        except (XdaskError, OSError) as exc:
            self.error.value = _error_html(exc)
            return
        options = [(f"{uid} ({m.get('model_name')})", uid) for uid, m in models.items()
                   if "chat" in (m.get("model_ability") or [])]
        if select and select not in [uid for _, uid in options]:
            # Kept selectable, so that sending shows the server's own "not found" message.
            options.append((f"{select} (not running)", select))
        _set_choices(self.model, options)
        if select:
            self.model.value = select

    @property
    def busy(self) -> bool:
        """True while an answer is streaming."""
        return self.last_send is not None and not self.last_send.done()

    def close(self) -> None:
        """Close this widget and the widgets inside it."""
        _close_tree(self)

    def clear(self) -> None:
        """Forget the conversation (the next message starts a new one)."""
        if self.busy:
            raise RuntimeError("an answer is still streaming")
        self.history = []
        self.transcript.children = []
        self.error.value = ""
        self.status.value = ""

    def _on_send(self) -> None:
        text = self.input.value
        try:
            self.send(text)
        except Exception as exc:  # noqa: BLE001 - shown, a button callback has nobody to raise to
            self.error.value = _error_html(exc)
            return
        self.input.value = ""

    def send(self, text: str) -> Future[str]:
        """Send ``text`` as the next user message; the future holds the whole answer.

        The answer streams into the transcript; the user message and the
        answer join :attr:`history` when the answer is complete (a failed
        request leaves the history as it was).
        """
        if self.busy:
            raise RuntimeError("an answer is still streaming")
        uid = self.model.value
        if not uid:
            raise ValueError("no model selected (launch one, then press the refresh button)")
        if not text.strip():
            raise ValueError("type a message first")
        self.error.value = ""
        self.updates = 0
        user = {"role": "user", "content": text}
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [user]
        answer = widgets.HTML(_bubble("assistant", "…"))
        self.transcript.children = [*self.transcript.children, widgets.HTML(_bubble("user", text)), answer]
        self.send_button.disabled = True
        self.status.value = _small(f"{html.escape(uid)} is answering…")
        self.last_send = _in_thread(self._stream, uid, messages, user, answer, name="xdask-chat")
        return self.last_send

    def _stream(self, uid: str, messages: list[dict[str, str]], user: dict[str, str], answer: widgets.HTML) -> str:
        started = time.monotonic()
        pieces: list[str] = []
        shown_at = 0.0
        try:
            for piece in chat_deltas(ModelHandle(self.client, uid, {}).chat(messages, stream=True, **self.params)):
                pieces.append(piece)
                now = time.monotonic()
                if now - shown_at >= self.update_interval:
                    answer.value = _bubble("assistant", "".join(pieces) + " ▌")
                    self.updates += 1
                    shown_at = now
        except Exception as exc:
            answer.value = _bubble("assistant", "".join(pieces) + " [failed]")
            self.error.value = _error_html(exc)
            self.status.value = ""
            raise
        finally:
            self.send_button.disabled = False
        text = "".join(pieces)
        answer.value = _bubble("assistant", text)
        self.updates += 1
        self.history += [user, {"role": "assistant", "content": text}]
        self.status.value = _small(f"{len(pieces)} chunks in {time.monotonic() - started:.1f} s")
        return text


__all__ = ["ChatWidget", "Launcher", "ModelRow", "ModelTable", "chat_deltas", "dashboard", "dashboard_url",
           "error_text"]
