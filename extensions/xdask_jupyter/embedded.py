"""Find or start the one embedded ``xdask-local`` of a Jupyter session.

The Jupyter server extension, the widgets and the magics each may need a
server when the user has none running. They must share one: two embedded
clusters would each load their own copy of every model. So whoever starts it
records it in ``XDASK_HOME/run/local.json`` (pid, endpoint, owner pid,
start time, log file), and everyone else reads that file first. A lock file
(``fcntl.flock``) around "check, else start" keeps two processes (a kernel and
the Jupyter server) from starting two at once.

Only the process that started the embedded server stops it (at exit, or when
the Jupyter extension stops): a kernel restart must not pull the server out
from under the Jupyter server, and the other way round.

Examples
--------
>>> from xdask_jupyter.embedded import ensure_local, local_endpoint, stop_local
>>> endpoint = ensure_local()          # doctest: +SKIP
>>> local_endpoint() == endpoint       # doctest: +SKIP
True
>>> stop_local()                       # doctest: +SKIP
True

On an event loop (Tornado, ipykernel), use the ``*_async`` variants: the
blocking versions wait for a process start of up to a few minutes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from xdask import config
from xdask.errors import EmbeddedServerError

logger = logging.getLogger(__name__)

#: The embedded server this process started (None if it started none).
_started: subprocess.Popen[bytes] | None = None
#: Serializes this process's threads; the flock serializes processes.
_thread_lock = threading.Lock()
_atexit_registered = False


def run_dir() -> pathlib.Path:
    """``XDASK_HOME/run``: the state, lock and output files of the embedded server."""
    path = config.home() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_file() -> pathlib.Path:
    """``XDASK_HOME/run/local.json``: which embedded server runs, and who started it."""
    return run_dir() / "local.json"


def read_state() -> dict[str, Any] | None:
    """The state file's content, or None if it is missing or unreadable (a torn write cannot happen)."""
    try:
        with state_file().open() as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Alive, but another user's: a reused pid, not our server.
        return False
    # A zombie (exited, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def probe(endpoint: str, timeout: float | None = None) -> bool:
    """True if ``GET {endpoint}/status`` answers 200 within ``xdask.jupyter.probe-timeout`` seconds."""
    timeout = float(config.get("jupyter.probe-timeout")) if timeout is None else timeout
    try:
        return httpx.get(f"{endpoint.rstrip('/')}/status", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


async def probe_async(endpoint: str, timeout: float | None = None) -> bool:
    """:func:`probe` without blocking the event loop."""
    timeout = float(config.get("jupyter.probe-timeout")) if timeout is None else timeout
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return (await client.get(f"{endpoint.rstrip('/')}/status")).status_code == 200
    except httpx.HTTPError:
        return False


def local_endpoint() -> str | None:
    """The endpoint of a running embedded xdask-local started by any process of this user.

    None if the state file is missing, its server process is dead, or its
    ``/status`` does not answer: callers then start one with :func:`ensure_local`.
    """
    state = read_state()
    if not state:
        return None
    pid, endpoint = state.get("pid"), state.get("endpoint")
    if not isinstance(pid, int) or not isinstance(endpoint, str) or not _pid_alive(pid):
        return None
    return endpoint if probe(endpoint) else None


def started_here() -> bool:
    """True while this process owns a running embedded server (it will stop it at exit)."""
    return _started is not None and _started.poll() is None


@contextlib.contextmanager
def _locked(timeout: float) -> Iterator[None]:
    """Hold ``run/local.lock`` (threads of this process first, then other processes)."""
    deadline = time.monotonic() + timeout
    if not _thread_lock.acquire(timeout=max(timeout, 0.0)):
        raise EmbeddedServerError(f"timed out after {timeout:.0f} s waiting for another start of xdask-local")
    try:
        with (run_dir() / "local.lock").open("a") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedServerError(
                            f"timed out after {timeout:.0f} s waiting for another process starting xdask-local "
                            f"(lock {f.name})"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        _thread_lock.release()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def _write_state(state: dict[str, Any]) -> None:
    """Write the state file atomically: readers see the old file or the whole new one."""
    path = state_file()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _remove_state_if(pid: int) -> None:
    """Remove the state file if it still names ``pid`` (another process may have replaced it)."""
    state = read_state()
    if state and state.get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            state_file().unlink()


def _kill_group(pid: int) -> None:
    # The server was started in its own session, so its pgid is its pid: this
    # also reaches Dask's nanny and worker processes if they outlived it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _start(timeout: float) -> str:
    """Start ``python -m xdask.cli_local`` on a free port and wait for its ``/status``."""
    global _started, _atexit_registered
    host = "127.0.0.1"
    port = _free_port(host)
    endpoint = f"http://{host}:{port}"
    out_path = run_dir() / "local.out"
    # The child must use the same home even when it came from dask config, not the environment.
    env = {**os.environ, "XDASK_HOME": str(config.home())}
    cmd = [sys.executable, "-m", "xdask.cli_local", "--host", host, "--port", str(port)]
    with out_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    logger.info("starting embedded xdask-local (pid %d) at %s; output in %s", proc.pid, endpoint, out_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            _kill_group(proc.pid)
            raise EmbeddedServerError(
                f"the embedded xdask-local exited with code {proc.returncode} before it answered; "
                f"end of {out_path}:\n{_tail(out_path)}"
            )
        if probe(endpoint, timeout=1.0):
            break
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            _kill_group(proc.pid)
            proc.wait()
            raise EmbeddedServerError(
                f"the embedded xdask-local did not answer {endpoint}/status within {timeout:.0f} s "
                f"(xdask.jupyter.local-start-timeout); end of {out_path}:\n{_tail(out_path)}"
            )
        time.sleep(0.2)
    _started = proc
    if not _atexit_registered:
        atexit.register(stop_local)
        _atexit_registered = True
    _write_state({
        "pid": proc.pid,
        "endpoint": endpoint,
        "owner_pid": os.getpid(),
        "started": time.time(),
        "log": str(out_path),
    })
    return endpoint


def ensure_local(timeout: float | None = None) -> str:
    """The endpoint of the embedded xdask-local, started now if none answers.

    Blocks until the server answers ``/status`` (at most ``timeout`` seconds,
    default ``xdask.jupyter.local-start-timeout``). This process then owns it
    and stops it at exit (``atexit``) or on :func:`stop_local`.

    Raises
    ------
    EmbeddedServerError
        The server exited or did not answer in time; the message holds the end
        of its output.
    """
    timeout = float(config.get("jupyter.local-start-timeout")) if timeout is None else float(timeout)
    endpoint = local_endpoint()
    if endpoint:
        return endpoint
    with _locked(timeout):
        # Checked again under the lock: another process may have just started one.
        endpoint = local_endpoint()
        if endpoint:
            return endpoint
        return _start(timeout)


def stop_local(timeout: float | None = None) -> bool:
    """Stop the embedded server if this process started it; True if it did.

    SIGINT first (xdask-local then terminates its models and closes its Dask
    cluster), SIGKILL of its process group after ``timeout`` seconds
    (default ``xdask.jupyter.local-stop-timeout``). Removes the state file.
    """
    global _started
    with _thread_lock:
        proc, _started = _started, None
    if proc is None:
        return False
    timeout = float(config.get("jupyter.local-stop-timeout")) if timeout is None else float(timeout)
    stopped = proc.poll() is None
    if stopped:
        logger.info("stopping embedded xdask-local (pid %d)", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("embedded xdask-local (pid %d) did not stop in %.0f s; killing it", proc.pid, timeout)
    _kill_group(proc.pid)
    proc.wait()
    _remove_state_if(proc.pid)
    return stopped


async def local_endpoint_async() -> str | None:
    """:func:`local_endpoint` in a thread, for callers on an event loop."""
    return await asyncio.to_thread(local_endpoint)


async def ensure_local_async(timeout: float | None = None) -> str:
    """:func:`ensure_local` in a thread: a start takes seconds and must not stall the event loop."""
    return await asyncio.to_thread(ensure_local, timeout)


async def stop_local_async(timeout: float | None = None) -> bool:
    """:func:`stop_local` in a thread (it waits for the server to stop)."""
    return await asyncio.to_thread(stop_local, timeout)
