"""A ``jupyter server`` subprocess with the xdask extension, for the tests that put Jupyter in front of xdask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from support.servers import free_port, wait_until

TOKEN = "xdask-test-token"
AUTH = {"Authorization": f"token {TOKEN}"}


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class JupyterServer:
    """A ``jupyter server`` subprocess with the xdask extension (enabled by the installed config)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, xdask_home: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dirs = {name: tmp / name for name in ("config", "data", "runtime", "root")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("XDASK_ENDPOINT", "JUPYTER_"))}
        self.env = {
            **base_env,
            "JUPYTER_CONFIG_DIR": str(dirs["config"]),
            "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
            "XDASK_HOME": str(xdask_home or tmp / "xdask-home"),
            **(env or {}),
        }
        self.log_path = tmp / "jupyter.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
             f"--ServerApp.token={TOKEN}", "--allow-root", f"--ServerApp.root_dir={dirs['root']}", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=300)
        if not wait_until(self._up, timeout=60, interval=0.2):
            self.stop()
            raise RuntimeError(f"jupyter server did not start:\n{self.log()}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            return True
        try:
            return self.http.get("/api/status").status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
