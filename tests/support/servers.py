"""Helpers shared by the tests: a real ``xdask-local`` subprocess (``LocalServer``), the default launch,
free ports, polling, and whether CI requires an engine.

Moved out of ``conftest.py`` so that test modules and the helper modules import them by name
(``from support.servers import LocalServer``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_LAUNCH = {
    "model_name": "gemma-3-270m",
    "model_engine": "llama.cpp",
    "model_format": "ggufv2",
    "quantization": "Q4_K_M",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A running ``xdask-local`` subprocess and what it printed."""

    def __init__(self, home: Path, port: int | None = None, extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "XDASK_HOME": str(home), **(extra_env or {})}
        self.lines: list[str] = []
        self.scheduler_address: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xdask.cli_local", "--host", "127.0.0.1", "--port", str(self.port),
             *(args or [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            start_new_session=True,
        )
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(120):
            self.stop()
            raise RuntimeError("xdask-local did not start:\n" + "".join(self.lines[-50:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"Dask scheduler (tcp://[\d.:]+)", line)
            if m:
                self.scheduler_address = m.group(1)
            if line.startswith("Press Ctrl-C"):
                self._ready.set()
        self._ready.set()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def engine_required(engine: str) -> bool:
    """CI lists the engines it installed in XDASK_TEST_REQUIRE_ENGINES: missing ones fail there."""
    wanted = os.environ.get("XDASK_TEST_REQUIRE_ENGINES", "")
    return engine in {e.strip() for e in wanted.split(",") if e.strip()}


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
