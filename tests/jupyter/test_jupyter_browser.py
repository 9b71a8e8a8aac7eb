"""JupyterLab in a real headless browser: the launcher launches, the table shows it, the dashboard draws.

Starts a real ``jupyter lab`` (with the xdask server extension pointed at the
session's ``xdask-local``), opens a notebook in Debian's ``chromium`` driven by
Playwright (no browser download), runs its cells, clicks the widgets' Launch
button and waits for the model in the running-models table; then opens the
dashboard through the extension's ``/xdask/dashboard`` proxy, checks that the
Bokeh plots are drawn and that their data follow the server live, without a
reload. Screenshots are written to ``XDASK_TEST_ARTIFACTS`` (default: the
test's tmp dir) and, with ``XDASK_UPDATE_SCREENSHOTS=1``, to
``notebooks/screenshots/`` for the README.

Skip locally with ``-m "not browser"``; CI sets ``XDASK_TEST_REQUIRE_BROWSER=1``
so a missing chromium fails there instead of skipping.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest
from support.servers import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "notebooks" / "screenshots"
TOKEN = "xdask-browser-test"
UID = "browser-model"

LAUNCHER_CELL = f"""
import xdask.jupyter as xj
client = xj.connect()
launcher = xj.Launcher(client)
launcher.model_uid.value = "{UID}"
launcher
"""
TABLE_CELL = """
table = xj.ModelTable(client, refresh_interval=1.0)
table
"""


def _chromium() -> str:
    path = os.environ.get("XDASK_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("XDASK_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (ci/install_browser.sh installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("XDASK_TEST_ARTIFACTS") or tmp_path / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _keep(shot: Path) -> None:
    """Copy a screenshot into the repo for the README when asked to."""
    if os.environ.get("XDASK_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOTS / shot.name)


class Lab:
    """A ``jupyter lab`` process with its own config, data, runtime and settings dirs."""

    def __init__(self, root: Path, endpoint: str, home: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = root / "config"
        cfg.mkdir()
        (cfg / "jupyter_server_config.py").write_text(
            f"c.ServerApp.token = {TOKEN!r}\n"
            "c.ServerApp.open_browser = False\n"
            "c.ServerApp.allow_root = True\n"
            "c.LabApp.news_url = None\n"
            "c.LabApp.check_for_updates_class = 'jupyterlab.handlers.announcements.NeverCheckForUpdate'\n"
            "c.LabApp.extension_manager = 'readonly'\n"
            "c.LabApp.expose_app_in_browser = True\n"
            f"c.XdaskExtension.endpoint = {endpoint!r}\n"
        )
        settings = root / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        self.notebooks = root / "work"
        self.notebooks.mkdir()
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(cfg),
            "JUPYTER_DATA_DIR": str(root / "data"),
            "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
            "XDASK_ENDPOINT": endpoint,  # the kernels' xj.connect()
            "XDASK_HOME": home,
        }
        self.log = open(root / "lab.log", "w")  # noqa: SIM115 (the process writes it until stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
             f"--ServerApp.root_dir={self.notebooks}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"token {TOKEN}"}, timeout=30)
        if not wait_until(self._up, 90, 0.5):
            self.stop()
            raise RuntimeError("jupyter lab did not start:\n" + (root / "lab.log").read_text()[-3000:])

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}")
        try:
            return self.http.get("/api/status").status_code == 200
        except httpx.HTTPError:
            return False

    def write_notebook(self, name: str, cells: list[str]) -> None:
        book = nbformat.v4.new_notebook()
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        book.cells = [nbformat.v4.new_code_cell(c.strip()) for c in cells]
        nbformat.write(book, self.notebooks / name)

    def kernel_ready(self) -> bool:
        """A kernel that is idle and has the page's websocket (lab's indicator shows idle earlier)."""
        sessions = self.http.get("/api/sessions").json()
        return any(s["kernel"]["execution_state"] == "idle" and s["kernel"]["connections"] > 0 for s in sessions)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture
def lab(tmp_path: Path, server, default_model: str) -> Iterator[Lab]:
    lab = Lab(tmp_path, server.endpoint, server.env["XDASK_HOME"])
    yield lab
    lab.stop()


@pytest.fixture
def browser(tmp_path: Path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _poll(page, predicate, timeout: float, what: str) -> None:
    """Wait for ``predicate()`` while letting the page run (never ``time.sleep`` with a live page)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _bokeh_column(page, source: str, column: str) -> list:
    """A column of the page's Bokeh data source called ``source`` as the browser holds it now."""
    return page.evaluate(
        """([name, column]) => {
            for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
                const model = doc.get_model_by_name(name);
                if (!model) continue;
                const data = model.data;
                const col = data instanceof Map ? data.get(column) : data[column];
                return col ? Array.from(col, v => (ArrayBuffer.isView(v) ? Array.from(v) : v)) : [];
            }
            return [];
        }""",
        [source, column],
    )


def _model_rate(page, uid: str) -> float:
    """The newest non-NaN requests/s sample of ``uid`` in the open dashboard's series."""
    models = _bokeh_column(page, "series_source", "model")
    rates = _bokeh_column(page, "series_source", "requests_rate")
    # Two separate reads of a live source: do not insist that they line up.
    for model, series in zip(models, rates, strict=False):
        if model == uid:
            values = [v for v in series if isinstance(v, (int, float)) and not math.isnan(v)]
            return max(values, default=0.0)
    return 0.0


def test_launcher_table_and_dashboard_in_jupyterlab(lab: Lab, browser, server, tmp_path: Path) -> None:
    artifacts = _artifacts(tmp_path)
    lab.write_notebook("launcher.ipynb", [LAUNCHER_CELL, TABLE_CELL])
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(f"{lab.url}/lab/tree/launcher.ipynb?token={TOKEN}")
    _poll(page, lab.kernel_ready, 90, "the notebook's kernel")
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=30_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

    launch = page.locator('button.jupyter-button[title="Launch"]')  # not lab's own "New Launcher"
    launch.wait_for(state="visible", timeout=60_000)
    assert httpx.get(f"{server.endpoint}/v1/models/{UID}").status_code == 404
    try:
        launch.click()
        row = page.get_by_text(UID, exact=True)
        _poll(page, lambda: row.count() > 0 and row.first.is_visible(), 180, f"{UID} in the models table")
        described = httpx.get(f"{server.endpoint}/v1/models/{UID}", timeout=30).json()
        assert described["state"] == "ready"
        # The table refreshes itself from "launching" to "ready" (no click, no re-run).
        _poll(page, lambda: page.get_by_text("launching").count() == 0, 30, "the table to show the model ready")
        shot = artifacts / "launcher.png"
        page.screenshot(path=str(shot))
        _keep(shot)

        # The dashboard through the Jupyter server extension's proxy (same cookie as the lab page).
        dash = context.new_page()  # the same context: lab's login cookie
        dash.set_viewport_size({"width": 1400, "height": 1100})
        dash.goto(f"{lab.url}/xdask/dashboard")
        _poll(dash, lambda: dash.locator("canvas").count() > 0, 60, "the dashboard's plots")
        _poll(dash, lambda: UID in _bokeh_column(dash, "replicas_source", "model"), 60,
              f"{UID} in the dashboard's replicas table")
        # Live: requests made now show up in the open page's rates without a reload.
        traffic = threading.Thread(target=_traffic, args=(server.endpoint, [UID, "gemma"], 12.0), daemon=True)
        traffic.start()
        _poll(dash, lambda: _model_rate(dash, UID) > 0, 60, "a non-zero request rate in the open dashboard")
        traffic.join(60)
        dash.wait_for_timeout(2500)  # the last samples and a redraw before the picture
        shot = artifacts / "dashboard.png"
        dash.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert shot.stat().st_size > 20_000  # a drawn page, not a blank one

        # Terminate from the table's button; the row goes away.
        page.bring_to_front()
        page.locator(f'button[title="Terminate {UID}"]').click()
        _poll(page, lambda: httpx.get(f"{server.endpoint}/v1/models/{UID}").status_code == 404, 60,
              f"{UID} terminated by its button")
    finally:
        httpx.delete(f"{server.endpoint}/v1/models/{UID}", timeout=60)


def _traffic(endpoint: str, uids: list[str], seconds: float) -> None:
    """Chat requests (streamed and not) on two connections for ``seconds``: something to plot."""
    def loop(uid: str, stream: bool) -> None:
        with httpx.Client(base_url=endpoint, timeout=120) as http:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                body = {"model": uid, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                        "max_tokens": 16, "stream": stream}
                with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    assert resp.status_code == 200
                    resp.read()

    threads = [threading.Thread(target=loop, args=(uid, i % 2 == 0)) for i, uid in enumerate(uids * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
