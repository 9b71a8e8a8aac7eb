"""The notebook widgets and connection, driven from Python against the real session server.

ipywidgets 8 builds widgets without a kernel (their comm is a ``DummyComm``),
so button clicks, dropdown cascades and background-thread updates run here
exactly as in a notebook, minus the browser (``test_jupyter_browser.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import dask.config
import pytest
from support.servers import wait_until

import xdask
from xdask.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    NotFoundError,
    UpstreamUnavailableError,
)
from xdask_jupyter import connection
from xdask_jupyter.widgets import ChatWidget, Launcher, ModelTable, dashboard

pytestmark = pytest.mark.slow

FAMILY = "gemma-3-270m"


@pytest.fixture
def client(server) -> Iterator[xdask.Client]:
    with xdask.Client(server.endpoint) as c:
        yield c


def _choose_default(launcher: Launcher, uid: str) -> None:
    launcher.family.value = FAMILY
    launcher.engine.value = "llama.cpp"
    launcher.model_uid.value = uid
    # Two slots: the session's 2-core machine loads it faster and it needs less memory.
    launcher.engine_options.value = "n_parallel=2"


def test_launcher_choices_cascade_from_the_engine_matrix(server, client) -> None:
    launcher = Launcher(client)
    assert launcher.model_type.value == "LLM"
    assert FAMILY in [v for _, v in launcher.family.options]
    launcher.family.value = FAMILY
    engines = [v for _, v in launcher.engine.options]
    assert "llama.cpp" in engines
    matrix = client.query_engines(FAMILY)
    assert set(engines) == {name for name, specs in matrix.items() if any(s["available"] for s in specs)}

    launcher.engine.value = "llama.cpp"
    assert [v for _, v in launcher.model_format.options] == ["ggufv2"]
    assert launcher.model_format.value == "ggufv2"
    assert [v for _, v in launcher.size.options] == ["0_27"]
    assert "Q4_K_M" in [v for _, v in launcher.quantization.options]
    assert launcher.quantization.value == "Q4_K_M"

    # Another family refills every dropdown below it.
    other = [v for _, v in launcher.family.options if v != FAMILY]
    if other:
        launcher.family.value = other[0]
        other_matrix = client.query_engines(other[0])
        assert [v for _, v in launcher.engine.options] == [
            n for n, specs in other_matrix.items() if any(s["available"] for s in specs)]
        launcher.family.value = FAMILY
        assert launcher.model_format.value == "ggufv2"

    payload = launcher.payload()
    assert payload["model_name"] == FAMILY and payload["model_engine"] == "llama.cpp"
    assert payload["quantization"] == "Q4_K_M" and payload["replica"] == 1
    assert "n_gpu" not in payload  # "auto": the server's default applies
    assert f"{server.endpoint}/dashboard" in launcher.links.value
    assert {"auto", 0} <= {v for _, v in launcher.n_gpu.options}
    assert [v for _, v in launcher.worker.options] == ["", *(w["address"] for w in client.list_workers())]
    assert launcher.worker.value == ""  # any worker
    launcher.close()


def test_launch_button_table_row_and_terminate_button(client) -> None:
    uid = "widget-model"
    launcher = Launcher(client)
    table = ModelTable(client, refresh_interval=None)
    try:
        _choose_default(launcher, uid)
        worker = launcher.worker.options[-1][1]
        launcher.worker.value = worker  # pinned to a worker, as --worker-address
        launcher.launch_button.click()
        assert launcher.last_launch is not None
        assert launcher.last_launch.result(180) == uid
        assert launcher.progress.bar_style == "success"
        assert launcher.progress.value == launcher.progress.max == 1
        assert f"{uid} ready" in launcher.status.value and "llama.cpp" in launcher.status.value
        assert launcher.error.value == ""
        assert not launcher.launch_button.disabled
        assert uid in client.list_models()

        assert table.refresh()
        row = table.rows[uid]
        assert client.describe_model(uid)["replicas"][0]["address"] == worker
        assert worker in row.replicas.value and "CPU" in row.replicas.value  # no GPU: placement says CPU
        assert "ready" in row.state.value and "llama.cpp" in row.engine.value and FAMILY in row.name.value
        assert re.search(r"#0 \d+ / \d+", row.load.value), row.load.value  # outstanding / in flight
        assert row.terminate_button in table.grid.children

        row.terminate_button.click()
        table.pending[uid].result(120)
        assert uid not in client.list_models()
        assert uid not in table.rows and row.terminate_button not in table.grid.children
    finally:
        table.close()
        launcher.close()
        if uid in client.list_models():
            client.terminate_model(uid)


def test_failed_launches_show_the_server_message(client) -> None:
    launcher = Launcher(client)
    try:
        _choose_default(launcher, "widget-fails")
        # More GPUs than any worker has: the server refuses with 503 insufficient_resources.
        launcher.n_gpu.options = [*launcher.n_gpu.options, ("99", 99)]
        launcher.n_gpu.value = 99
        launcher.launch_button.click()
        with pytest.raises(ModelNotReadyError) as info:
            launcher.last_launch.result(60)
        assert info.value.code == "insufficient_resources"
        assert info.value.message in launcher.error.value and "insufficient_resources" in launcher.error.value
        assert "color:#c62828" in launcher.error.value
        assert launcher.progress.bar_style == "danger" and "failed" in launcher.status.value
        assert not launcher.launch_button.disabled and not launcher.running

        # An engine option llama.cpp does not know: the engine's message, with the options it accepts.
        launcher.n_gpu.value = "auto"
        launcher.engine_options.value = "no_such_option=3"
        with pytest.raises(InvalidRequestError):
            launcher.launch().result(60)
        assert "no_such_option" in launcher.error.value and "n_parallel" in launcher.error.value

        # Malformed options fail before any request, with the CLI's own message.
        launcher.engine_options.value = "n_parallel"
        future = launcher.launch()
        assert future.done() and future.exception() is not None
        assert "KEY=VALUE" in launcher.error.value
        assert "widget-fails" not in client.list_models()
    finally:
        launcher.close()


def test_model_table_refreshes_itself_and_stops_on_close(client, default_model) -> None:
    table = ModelTable(client, refresh_interval=0.2)
    thread = table._thread
    try:
        assert default_model in table.rows
        assert thread is not None and thread.is_alive()
        first = table.status.value
        assert wait_until(lambda: table.status.value != first, timeout=5)  # the clock in it moved on
    finally:
        table.close()
    assert not thread.is_alive()

    # A server that does not answer: the table says so and does not raise.
    with xdask.Client("http://127.0.0.1:1", timeout=2) as dead:
        broken = ModelTable(dead, refresh_interval=None)
        assert "refresh failed" in broken.status.value and broken.rows == {}
        assert broken.refresh() is False
        broken.close()


def test_chat_widget_streams_and_keeps_history(client, default_model) -> None:
    chat = ChatWidget(client, model_uid=default_model, max_tokens=32, update_interval=0.0)
    try:
        assert chat.model.value == default_model
        answer = chat.send("Name three colours.").result(120)
        assert answer.strip()
        assert chat.updates >= 3  # streamed: the answer grew in several updates, not once at the end
        assert [m["role"] for m in chat.history] == ["user", "assistant"]
        assert chat.history[1]["content"] == answer
        assert len(chat.transcript.children) == 2
        assert chat.error.value == "" and not chat.send_button.disabled

        chat.input.value = "And three more."
        chat.send_button.click()
        assert chat.last_send is not None and chat.last_send.result(120).strip()
        assert len(chat.history) == 4 and chat.input.value == ""
        chat.clear()
        assert chat.history == [] and chat.transcript.children == ()
    finally:
        chat.close()

    missing = ChatWidget(client, model_uid="no-such-model")
    with pytest.raises(NotFoundError):
        missing.send("Hi").result(60)
    assert "no-such-model" in missing.error.value and missing.history == []
    missing.close()


def test_dashboard_iframe(server, client) -> None:
    frame = dashboard(client, height=500)
    assert frame.src == f"{server.endpoint}/dashboard" and frame.height == 500
    assert f'src="{server.endpoint}/dashboard"' in frame._repr_html_()
    assert dashboard(client, proxy=True).src == "/xdask/dashboard"
    assert dashboard(client, proxy=True, base_url="/user/me/").src == "/user/me/xdask/dashboard"


def test_connect_to_a_url(server, monkeypatch) -> None:
    client = connection.connect(server.endpoint)
    assert client.endpoint == server.endpoint and connection.current_client() is client
    assert connection.connect(server.endpoint.removeprefix("http://")).endpoint == server.endpoint

    with pytest.raises(UpstreamUnavailableError, match="127.0.0.1:1"):
        connection.connect("http://127.0.0.1:1")
    assert connection.current_client().endpoint == server.endpoint  # a failed connect changes nothing

    monkeypatch.setenv("XDASK_ENDPOINT", server.endpoint)
    assert connection.connect().endpoint == server.endpoint


def test_connect_local_starts_one_shared_embedded_server(server, tmp_path, monkeypatch) -> None:
    """Needs ``xdask_jupyter.embedded`` (ensure_local, local_endpoint, stop_local)."""
    from xdask_jupyter import embedded

    monkeypatch.delenv("XDASK_ENDPOINT", raising=False)
    with dask.config.set({"xdask.home": str(tmp_path / "home")}):
        try:
            local = connection.connect("local")
            assert local.endpoint != server.endpoint
            assert embedded.local_endpoint() == local.endpoint
            assert connection.server_status(local.endpoint)["status"] == "ok"
            # The default chain prefers the embedded server that already runs over starting another.
            assert connection.connect().endpoint == local.endpoint
            assert connection.connect("local").endpoint == local.endpoint
        finally:
            embedded.stop_local()
    connection.connect(server.endpoint)
