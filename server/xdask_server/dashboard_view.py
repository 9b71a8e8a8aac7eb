"""The live dashboard at ``/dashboard/``: one static Bokeh page that polls JSON data URLs.

What it shows: each model's replicas (worker, GPUs, state, requests in flight
here and on the actor), its queue depth, requests/s, tokens/s and latency
over the last minutes, each worker's GPUs used and free and its memory, and
links to Dask's own dashboard and to the API.

Why a static page with ``AjaxDataSource`` and not a Bokeh server app: the
page must also work behind Jupyter's HTTP proxy (``/xdask/dashboard`` →
``/dashboard``), which relays plain HTTP requests but no Bokeh websocket;
and a static page costs the server nothing until someone polls it. So the
HTML (with BokehJS inline: no CDN, the page works offline) is built once and
cached, and every URL in it is *relative*: the page is served at
``/dashboard/`` (``/dashboard`` redirects to ``dashboard/``), so
``data/models`` resolves to ``/dashboard/data/models`` here and to
``/xdask/dashboard/data/models`` behind the proxy.

URL layout (handlers in ``handlers.py``):

======================================  ==================================================
``GET /dashboard``                      302 to ``dashboard/`` (relative Location)
``GET /dashboard/``                     the page (HTML, cached)
``GET /dashboard/data/models``          per model: state, totals, recent rates and latency
``GET /dashboard/data/replicas``        per replica: model, engine, worker, GPUs, load
``GET /dashboard/data/workers``         per worker: GPUs used/free, memory, replicas
``GET /dashboard/data/series``          per model: the sampled history (multi_line rows)
``GET /dashboard/data/links``           the header's HTML (Dask dashboard link)
``GET /dashboard/links/api``            302 to ``/v1/models`` (the proxy maps it to its API prefix)
======================================  ==================================================

Models come and go while the page is open, so nothing here is built per
model: each source has one row per model (or replica, or worker) and the
charts draw rows (``multi_line`` with the model uid as legend and hover).

Examples
--------
>>> page = build_page(poll_ms=1000)                              # doctest: +SKIP
>>> "cdn.bokeh.org" in page
False
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, Literal, cast

from xdask import config
from xdask.cluster.supervisor import Supervisor
from xdask.errors import NotFoundError
from xdask_server.stats import SAMPLE_FIELDS, RequestStats, Sampler

logger = logging.getLogger(__name__)

GIB = 2**30

#: Colours of the models' lines, chosen by a hash of the uid so a model keeps its colour across polls.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

#: Columns of each data URL; the page's sources start with these (empty), the endpoints return them.
MODEL_COLUMNS = ("model", "engine", "state", "replicas", "in_flight", "requests_total", "errors_total",
                 "cancelled_total", "tokens_total", "requests_rate", "tokens_rate", "latency_mean",
                 "latency_p95", "ttft_mean")
REPLICA_COLUMNS = ("model", "engine", "replica_id", "address", "gpu_idx", "state", "outstanding", "in_flight")
WORKER_COLUMNS = ("row", "address", "name", "status", "nthreads", "gpus_total", "gpus_used", "gpus_free",
                  "gpu_used_idx", "gpu_free_idx", "memory_used", "memory_limit", "replicas", "label")
SERIES_COLUMNS = ("model", "color", "xs", *SAMPLE_FIELDS[1:])
LINK_COLUMNS = ("html", "dask_dashboard")


def color_of(uid: str) -> str:
    """A model's line colour (stable across polls and restarts)."""
    return _PALETTE[zlib.crc32(uid.encode()) % len(_PALETTE)]


def _columns(names: tuple[str, ...], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as the column dict an ``AjaxDataSource`` expects (every column present, even with no rows)."""
    return {name: [r[name] for r in rows] for name in names}


# -- data: pure functions of what the supervisor and the statistics say --------------------------------


def model_rows(records: list[dict[str, Any]], stats: RequestStats, sampler: Sampler) -> dict[str, list[Any]]:
    """``data/models``: one row per running model: its totals, and rates, p95 latency and TTFT of the last
    ``xdask.dashboard.summary-window`` seconds."""
    rows = []
    for record in records:
        uid = record["model_uid"]
        entry = stats.models.get(uid)
        totals = entry.totals() if entry is not None else {}
        recent = sampler.recent(uid)
        ready = sum(1 for r in record["replicas"] if r["state"] == "ready")
        rows.append({
            "model": uid,
            "engine": record["spec"].get("model_engine"),
            "state": record["state"],
            "replicas": f"{ready}/{len(record['replicas'])}",
            "in_flight": totals.get("in_flight", 0),
            "requests_total": totals.get("requests_total", 0),
            "errors_total": totals.get("errors_total", 0),
            "cancelled_total": totals.get("cancelled_total", 0),
            "tokens_total": totals.get("tokens_total", 0),
            "requests_rate": recent["requests_rate"],
            "tokens_rate": recent["tokens_rate"],
            "latency_mean": totals.get("latency_mean", 0.0),
            "latency_p95": recent["latency_p95"],
            "ttft_mean": recent["ttft_mean"],
        })
    return _columns(MODEL_COLUMNS, rows)


def replica_rows(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``data/replicas``: one row per replica; ``load`` is what ``Supervisor.describe_models`` added."""
    rows = []
    for record in records:
        for rep in record["replicas"]:
            load = rep.get("load") or {}
            in_flight = load.get("in_flight")
            rows.append({
                "model": record["model_uid"],
                "engine": record["spec"].get("model_engine"),
                "replica_id": rep["replica_id"],
                "address": rep.get("address") or "",
                "gpu_idx": ",".join(str(i) for i in rep.get("gpu_idx") or []) or "-",
                "state": rep["state"],
                "outstanding": load.get("outstanding", 0),
                "in_flight": "-" if in_flight is None else in_flight,
            })
    return _columns(REPLICA_COLUMNS, rows)


def worker_rows(workers: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``data/workers``: one row per worker; ``row`` places its bars (0 at the top)."""
    rows = []
    for i, w in enumerate(sorted(workers, key=lambda w: w["address"])):
        gpus = w.get("gpus") or {}
        total, used, free = int(gpus.get("total", 0)), list(gpus.get("used", [])), list(gpus.get("free", []))
        memory = w.get("memory") or {}
        replicas = [f"{m['model_uid']}/{m['replica_id']}" for m in w.get("models", [])]
        gpu_text = f"{len(used)} of {total} GPUs used" if total else "no GPUs"
        rows.append({
            "row": i,
            "address": w["address"],
            "name": w.get("name", ""),
            "status": w.get("status", ""),
            "nthreads": w.get("nthreads", 0),
            "gpus_total": total,
            "gpus_used": len(used),
            "gpus_free": len(free),
            "gpu_used_idx": ",".join(map(str, used)) or "-",
            "gpu_free_idx": ",".join(map(str, free)) or "-",
            "memory_used": round(memory.get("used", 0) / GIB, 2),
            "memory_limit": round(memory.get("limit", 0) / GIB, 2),
            "replicas": ", ".join(replicas) or "-",
            "label": f"{w['address']}  ({gpu_text})",
        })
    return _columns(WORKER_COLUMNS, rows)


def series_rows(sampler: Sampler) -> dict[str, list[Any]]:
    """``data/series``: one row per model, each column a list (its history) for ``multi_line``."""
    rows = []
    for uid, cols in sorted(sampler.series().items()):
        row: dict[str, Any] = {"model": uid, "color": color_of(uid), "xs": cols["time"]}
        row.update({name: cols[name] for name in SAMPLE_FIELDS[1:]})
        rows.append(row)
    return _columns(SERIES_COLUMNS, rows)


def header_html(dask_link: str | None, missing: str = "Dask dashboard not running") -> str:
    """The header's links: Dask's dashboard (else ``missing``, which says why there is none) and the API."""
    if dask_link:
        link = html.escape(dask_link, quote=True)
        dask = f'<a href="{link}" target="_blank" rel="noopener">Dask dashboard</a>'
    else:
        dask = html.escape(missing)
    return (
        '<div style="font-family: sans-serif; font-size: 14px">'
        "<b>xdask</b> &mdash; models and scheduling &nbsp;|&nbsp; "
        f"{dask} &nbsp;|&nbsp; "
        '<a href="links/api" target="_blank" rel="noopener">API: /v1/models</a>'
        "</div>"
    )


def link_rows(dask_link: str | None) -> dict[str, list[Any]]:
    """``data/links``: one row, the header's HTML and the Dask dashboard URL (None when off)."""
    return _columns(LINK_COLUMNS, [{"html": header_html(dask_link), "dask_dashboard": dask_link}])


# -- the page ------------------------------------------------------------------------------------------


#: Turns the JSON nulls of ``data/series`` (no request ended in that sample) into NaN, which a line skips;
#: JSON has no NaN, and BokehJS would read null as 0.
_NULLS_TO_NAN = """
const data = cb_data.response;
for (const [name, rows] of Object.entries(data)) {
    if (name === "model" || name === "color") continue;
    data[name] = rows.map((row) => row.map((v) => (v === null ? NaN : v)));
}
return data;
"""


def _source(name: str, url: str, columns: tuple[str, ...], poll_ms: int, adapter: str | None = None) -> Any:
    from bokeh.models import AjaxDataSource, CustomJS

    # GET, not Bokeh's default POST: Jupyter's proxy and caches treat a poll as the read it is.
    return AjaxDataSource(name=f"{name}_source", data_url=url, polling_interval=poll_ms, mode="replace",
                          method="GET", data={c: [] for c in columns},
                          adapter=CustomJS(code=adapter) if adapter else None)


def _table(name: str, source: Any, columns: list[tuple[str, str, str | None]], height: int) -> Any:
    from bokeh.models import CustomJS
    from bokeh.models.widgets import DataTable, NumberFormatter, TableColumn

    table_columns = [
        TableColumn(field=field, title=title,
                    formatter=NumberFormatter(format=fmt, nan_format="-", null_format="-")) if fmt
        else TableColumn(field=field, title=title)
        for field, title, fmt in columns
    ]
    table = DataTable(name=name, source=source, columns=table_columns, height=height, index_position=None,
                      sizing_mode="stretch_width", reorderable=False)
    # BokehJS redraws a table when its view's indices change, i.e. when the number of rows does; a poll
    # that replaces the values of the same rows would leave the old numbers on screen without this.
    source.js_on_change("data", CustomJS(args={"table": table}, code="table.view.change.emit()"))
    return table


def _time_figure(name: str, title: str, y_label: str, source: Any, lines: list[tuple[str, str | None]]) -> Any:
    """A time-series chart: one line per model (a row of ``source``) for each ``(column, dash)``."""
    from bokeh.models import DatetimeTickFormatter, HoverTool
    from bokeh.plotting import figure

    fig = figure(name=name, title=title, x_axis_type="datetime", height=230, sizing_mode="stretch_width",
                 tools="pan,wheel_zoom,box_zoom,reset,save", y_axis_label=y_label)
    for i, (column, dash) in enumerate(lines):
        legend: dict[str, Any] = {"legend_field": "model"} if i == 0 else {}  # one legend entry per model
        fig.multi_line(xs="xs", ys=column, source=source, line_color="color", line_width=2,
                       line_dash=dash or "solid", **legend)
    fig.add_tools(HoverTool(tooltips=[("model", "@model"), ("time", "$x{%H:%M:%S}"), (y_label, "$y{0.00}")],
                            formatters={"$x": "datetime"}))
    cast(Any, fig.y_range).start = 0  # a DataRange1d; typed as the base Range
    # Wall-clock seconds on every zoom level (Bokeh's default shows "0ms" ticks for short spans).
    fig.xaxis.formatter = DatetimeTickFormatter(microseconds="%H:%M:%S.%3N", milliseconds="%H:%M:%S.%3N",
                                                seconds="%H:%M:%S",
                                                minsec="%H:%M:%S", minutes="%H:%M", hourmin="%H:%M",
                                                hours="%H:%M", context=None)
    fig.legend.location = "top_left"
    fig.legend.background_fill_alpha = 0.6
    return fig


def _bar_figure(name: str, title: str, x_label: str, source: Any,
                bars: list[tuple[str | float, str, str, str]]) -> Any:
    """Horizontal bars per worker (``row``), stacked from ``left`` to ``right`` columns, with its label."""
    from bokeh.models import DataRange1d, HoverTool
    from bokeh.plotting import figure

    fig = figure(name=name, title=title, height=200, sizing_mode="stretch_width", x_axis_label=x_label,
                 y_range=DataRange1d(flipped=True, range_padding=0.3), tools="reset,save")
    fig.yaxis.visible = False
    fig.ygrid.grid_line_color = None
    for left, right, color, legend in bars:
        fig.hbar(y="row", left=left, right=right, height=0.5, source=source, color=color, legend_label=legend)
    fig.text(x=0, y="row", text="label", source=source, y_offset=-14, text_font_size="11px")
    fig.add_tools(HoverTool(tooltips=[("worker", "@address"), ("GPUs used", "@gpu_used_idx"),
                                      ("GPUs free", "@gpu_free_idx"),
                                      ("memory GiB", "@memory_used / @memory_limit")]))
    cast(Any, fig.x_range).start = 0  # a DataRange1d; typed as the base Range
    fig.legend.location = "bottom_right"
    fig.legend.orientation = "horizontal"
    return fig


def build_layout(poll_ms: int) -> Any:
    """The page's Bokeh layout; every data URL in it is relative to the page (``/dashboard/``)."""
    from bokeh.layouts import column, row
    from bokeh.models import CustomJS
    from bokeh.models.widgets import Div

    models = _source("models", "data/models", MODEL_COLUMNS, poll_ms)
    replicas = _source("replicas", "data/replicas", REPLICA_COLUMNS, poll_ms)
    workers = _source("workers", "data/workers", WORKER_COLUMNS, poll_ms)
    series = _source("series", "data/series", SERIES_COLUMNS, poll_ms, adapter=_NULLS_TO_NAN)
    links = _source("links", "data/links", LINK_COLUMNS, poll_ms * 10)

    # The Div's tags hold the links source: nothing else in the layout refers to it, and a model no root
    # refers to is left out of the page.
    header = Div(name="header", text=header_html(None, missing="Dask dashboard: loading ..."),
                 sizing_mode="stretch_width", tags=[links])
    links.js_on_change("data", CustomJS(args={"div": header, "source": links}, code="""
        const html = source.data.html;
        if (html && html.length) { div.text = html[0]; }
    """))
    models_table = _table("models", models, [
        ("model", "model", None), ("engine", "engine", None), ("state", "state", None),
        ("replicas", "ready/replicas", None), ("in_flight", "in flight", None),
        ("requests_total", "requests", None), ("errors_total", "errors", None),
        ("cancelled_total", "cancelled", None), ("tokens_total", "tokens", None),
        ("requests_rate", "req/s (recent)", "0.00"), ("tokens_rate", "tok/s (recent)", "0.0"),
        ("latency_mean", "mean latency s", "0.000"), ("latency_p95", "p95 latency s (recent)", "0.000"),
        ("ttft_mean", "TTFT s (recent)", "0.000"),
    ], height=140)
    replicas_table = _table("replicas", replicas, [
        ("model", "model", None), ("engine", "engine", None), ("replica_id", "replica", None),
        ("address", "worker", None), ("gpu_idx", "GPUs", None), ("state", "state", None),
        ("outstanding", "outstanding here", None), ("in_flight", "in flight on actor", None),
    ], height=140)
    workers_table = _table("workers", workers, [
        ("address", "worker", None), ("name", "name", None), ("status", "status", None),
        ("nthreads", "threads", None), ("gpu_used_idx", "GPUs used", None), ("gpu_free_idx", "GPUs free", None),
        ("memory_used", "memory GiB", "0.00"), ("memory_limit", "limit GiB", "0.00"),
        ("replicas", "replicas", None),
    ], height=120)
    charts = [
        _time_figure("queue", "Queue depth (in flight at this server, peak per sample)", "requests", series,
                     [("queue_peak", None)]),
        _time_figure("requests_rate", "Requests/s", "req/s", series, [("requests_rate", None)]),
        _time_figure("tokens_rate", "Tokens/s (completion)", "tok/s", series, [("tokens_rate", None)]),
        _time_figure("latency", "Latency: mean (solid) and p95 (dashed)", "seconds", series,
                     [("latency_mean", None), ("latency_p95", "dashed")]),
    ]
    gpus = _bar_figure("gpus", "GPUs per worker", "GPUs", workers,
                       [(0, "gpus_used", "#d62728", "used"), ("gpus_used", "gpus_total", "#2ca02c", "free")])
    memory = _bar_figure("memory", "Memory per worker", "GiB", workers,
                         [(0, "memory_used", "#1f77b4", "used"), ("memory_used", "memory_limit", "#c6dbef",
                                                                       "limit")])
    stretch: Literal["stretch_width"] = "stretch_width"
    return column(
        header, models_table,
        row(charts[0], charts[1], sizing_mode=stretch), row(charts[2], charts[3], sizing_mode=stretch),
        replicas_table, row(gpus, memory, sizing_mode=stretch), workers_table,
        name="xdask_dashboard", sizing_mode=stretch,
    )


def build_page(poll_ms: int) -> str:
    """The whole page as HTML, BokehJS inline (no CDN: it must work offline and behind a proxy)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    page = file_html(build_layout(poll_ms), resources=INLINE, title="xdask dashboard")
    # No favicon request: it would go to the server's root, outside the dashboard (and a proxy's prefix).
    return page.replace("<head>", '<head>\n    <link rel="icon" href="data:,">', 1)


@dataclass(frozen=True)
class Page:
    """The built page and its ETag (the page never changes while the server runs)."""

    html: bytes
    etag: str


# -- the data behind the URLs ---------------------------------------------------------------------------


class Dashboard:
    """The dashboard's page and data for one server: reads the supervisor and the request statistics.

    The cluster view (models with each replica's actor load, workers, Dask's
    dashboard link) is fetched at most once per ``xdask.dashboard.cache-ttl``
    seconds however many pages poll, and concurrent polls share one fetch:
    reading the actors' loads costs a call to each replica's worker.

    Examples
    --------
    >>> dash = Dashboard(supervisor, serving.stats, sampler)        # doctest: +SKIP
    >>> (await dash.data("models"))["model"]
    ['gemma']
    """

    def __init__(self, supervisor: Supervisor, stats: RequestStats, sampler: Sampler):
        self.supervisor = supervisor
        self.stats = stats
        self.sampler = sampler
        self._view: tuple[float, dict[str, Any]] | None = None
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._page: asyncio.Future[Page] | None = None

    async def page(self) -> Page:
        """The page, built once in a thread (building it reads ~2 MB of BokehJS; the loop keeps serving)."""
        if self._page is None or (self._page.done() and self._page.exception() is not None):
            poll_ms = int(config.get("dashboard.poll-interval"))
            self._page = asyncio.ensure_future(asyncio.to_thread(_page, poll_ms))
        return await asyncio.shield(self._page)

    async def data(self, name: str) -> dict[str, list[Any]]:
        """The columns of ``data/<name>``."""
        if name == "series":
            return series_rows(self.sampler)
        if name not in ("models", "replicas", "workers", "links"):
            raise NotFoundError(f"No dashboard data {name!r}")
        view = await self._cluster()
        if name == "models":
            return model_rows(view["records"], self.stats, self.sampler)
        if name == "replicas":
            return replica_rows(view["records"])
        if name == "workers":
            return worker_rows(view["workers"])
        return link_rows(view["dask_dashboard"])

    async def _cluster(self) -> dict[str, Any]:
        ttl = float(config.get("dashboard.cache-ttl"))
        if self._view is not None and time.monotonic() - self._view[0] < ttl:
            return self._view[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._fetch())
            self._pending.add_done_callback(self._fetched)
        return await asyncio.shield(self._pending)

    def _fetched(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._view = (time.monotonic(), future.result())

    async def _fetch(self) -> dict[str, Any]:
        records, workers, link = await asyncio.gather(
            self.supervisor.describe_models(), self.supervisor.workers(), self.supervisor.dask_dashboard_link())
        return {"records": records, "workers": workers, "dask_dashboard": link}


def _page(poll_ms: int) -> Page:
    started = time.perf_counter()
    body = build_page(poll_ms).encode()
    logger.info("Built the dashboard page (%d kB) in %.2f s", len(body) // 1024, time.perf_counter() - started)
    return Page(body, '"' + hashlib.sha1(body).hexdigest() + '"')
