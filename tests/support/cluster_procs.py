"""A cluster of real processes for tests and benchmarks: ``dask scheduler``, ``xdask-worker``s, ``xdask-server``.

Each is its own OS process started the way the README tells an operator to,
so killing one (``kill -9``) is the real failure, not a simulation.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from support.servers import free_port, wait_until


class Proc:
    """One subprocess with its output collected (and searchable) in the background."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def find(self, pattern: str) -> re.Match[str] | None:
        for line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return m
        return None

    def tail(self, n: int = 40) -> str:
        return f"--- {self.name} ---\n" + "".join(self.lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill()
        self.proc.wait()

    def kill(self) -> None:
        """``kill -9`` the whole process group (the process and its children)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def command(script: str, fallback: list[str], *args: str) -> list[str]:
    """The console script ``script`` of this environment (as an operator runs it), else ``python -m ...``."""
    exe = Path(sys.executable).parent / script
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", *fallback, *args]


class ProcCluster:
    """``dask scheduler`` + N ``xdask-worker --resources GPU=g`` + ``xdask-server``, all separate processes."""

    def __init__(self, home: Path, n_workers: int = 3, gpus: int | None = 2, env: dict[str, str] | None = None,
                 worker_args: list[str] | None = None):
        self.home = home
        self.env = {**os.environ, "XDASK_HOME": str(home), **(env or {})}
        self.scheduler_port = free_port()
        self.scheduler_address = f"tcp://127.0.0.1:{self.scheduler_port}"
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        self.server: Proc | None = None
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        try:
            scheduler = command("dask", ["distributed.cli.dask_scheduler"], "scheduler")
            if scheduler[0] == sys.executable:
                scheduler.remove("scheduler")
            self.scheduler = self._start("scheduler", [*scheduler, "--host", "127.0.0.1",
                                                       "--port", str(self.scheduler_port), "--no-dashboard"])
            for i in range(n_workers):
                self.add_worker(f"w{i}", gpus, worker_args)
            self.start_server()
            if not wait_until(lambda: len(self.worker_list()) == n_workers, 60):
                raise RuntimeError("workers did not all register")
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.env)
        self.procs.append(proc)
        return proc

    def add_worker(self, name: str, gpus: int | None, extra: list[str] | None = None) -> Proc:
        """``xdask-worker`` with ``--resources GPU=gpus``, or GPUs detected when ``gpus`` is None."""
        argv = command("xdask-worker", ["xdask.cli_cluster"], "--scheduler", self.scheduler_address,
                       "--host", "127.0.0.1", "--name", name, "--nthreads", "2", "--no-dashboard",
                       *(["--resources", f"GPU={gpus}"] if gpus is not None else []), *(extra or []))
        proc = self._start(f"worker {name}", argv)
        self.workers.append(proc)
        return proc

    def start_server(self) -> Proc:
        argv = command("xdask-server", ["xdask.cli", "serve"], "--scheduler", self.scheduler_address,
                       "--host", "127.0.0.1", "--port", str(self.port))
        self.server = self._start("server", argv)
        if not wait_until(self._server_up, 60, 0.2):
            raise RuntimeError("xdask-server did not start\n" + self.server.tail())
        return self.server

    def _server_up(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/status", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def worker_list(self) -> list[dict[str, Any]]:
        try:
            return httpx.get(f"{self.endpoint}/v1/cluster/workers", timeout=10).json()["data"]
        except (httpx.HTTPError, KeyError, ValueError):
            return []

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=20)


def worker_pid(scheduler_address: str, worker_address: str) -> int:
    """The OS pid of a Dask worker process (not its nanny)."""
    from distributed import Client

    with Client(scheduler_address, timeout=30) as client:
        return client.run(os.getpid, workers=[worker_address])[worker_address]


def kill_worker(scheduler_address: str, worker_address: str) -> float:
    """``kill -9`` one worker process; returns the time it was killed (``time.monotonic``)."""
    pid = worker_pid(scheduler_address, worker_address)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()
