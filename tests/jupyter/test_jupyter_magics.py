"""``%load_ext xdask.jupyter``: ``%xdask`` and ``%%chat`` in a real IPython shell against the session server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any

import pytest
from IPython.utils.capture import capture_output

import xdask
from xdask_jupyter import connection

pytestmark = pytest.mark.slow

UID = "magic-model"


@pytest.fixture(scope="module")
def ip(server) -> Iterator[Any]:
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "xdask.jupyter")
    yield shell
    connection.connect(server.endpoint)


@pytest.fixture
def client(server) -> Iterator[xdask.Client]:
    with xdask.Client(server.endpoint) as c:
        yield c


class _CountingStdout(io.StringIO):
    """Counts non-empty writes: a streamed answer arrives in many, a buffered one in one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        if s:
            self.writes += 1
        return super().write(s)


def _cell(ip: Any, source: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run a cell as a user would (errors shown, not raised); its stdout and stderr."""
    capsys.readouterr()
    ip.run_cell(source)
    out = capsys.readouterr()
    return out.out, out.err


def test_connect_launch_list_chat_terminate(ip, server, client, capsys) -> None:
    out, err = _cell(ip, f"%xdask connect {server.endpoint}", capsys)
    assert f"Connected to {server.endpoint}" in out and "status ok" in out, err
    assert connection.current_client().endpoint == server.endpoint

    try:
        out, err = _cell(ip, f"%xdask launch -n gemma-3-270m -en llama.cpp -u {UID} --n_parallel 2", capsys)
        assert f"Model uid: {UID}" in out and "engine: llama.cpp" in out, err
        assert client.describe_model(UID)["engine"]["n_parallel"] == 2  # the pass-through engine option

        out, _ = _cell(ip, "%xdask list", capsys)
        assert UID in out and "gemma-3-270m" in out and "ready" in out

        out, _ = _cell(ip, "%xdask workers", capsys)
        assert client.list_workers()[0]["address"] in out and UID in out

        stdout = _CountingStdout()
        with redirect_stdout(stdout):
            ip.run_cell_magic("chat", f"{UID} --max-tokens 24", "Name three colours.")
        answer = stdout.getvalue()
        assert answer.strip()
        assert stdout.writes >= 3  # printed chunk by chunk as it streamed
        magics = ip.magics_manager.registry["XdaskMagics"]
        assert magics.last_answer and magics.last_answer.strip() in answer

        with redirect_stdout(io.StringIO()) as second:
            ip.run_cell_magic("chat", f"{UID} --max-tokens 16 --continue --system 'Be brief.'", "One more.")
        assert second.getvalue().strip()
        assert len(magics._conversations[UID]) == 4  # --continue sent the first exchange along

        out, err = _cell(ip, f"%xdask terminate {UID}", capsys)
        assert f"Terminated {UID}" in out, err
        assert UID not in client.list_models()
    finally:
        if UID in client.list_models():
            client.terminate_model(UID)


@pytest.mark.parametrize(("source", "expected"), [
    ("%xdask terminate no-such-model", "not found"),
    ("%xdask frobnicate", "unknown command 'frobnicate'"),
    ("%xdask launch -u x", "Missing option '--model-name'"),
    ("%xdask launch -n gemma-3-270m -en llama.cpp -u magic-fails --n-gpu 99", "GPU"),
    ("%xdask launch -n gemma-3-270m -en llama.cpp -u magic-fails --no_such_option 1", "no_such_option"),
    ("%%chat no-such-model\nHello", "no-such-model"),
    ("%%chat\nHello", "model_uid"),
    ("%xdask connect 'unbalanced", "quotation"),
])
def test_errors_are_one_clear_line(ip, server, client, capsys, source: str, expected: str) -> None:
    connection.connect(server.endpoint)
    out, err = _cell(ip, source, capsys)
    assert "UsageError" in err and expected in err, (out, err)
    assert "Traceback" not in out + err
    assert "magic-fails" not in client.list_models()


def test_connect_to_nothing_fails_clearly_and_keeps_the_connection(ip, server, capsys) -> None:
    connection.connect(server.endpoint)
    out, err = _cell(ip, "%xdask connect http://127.0.0.1:1", capsys)
    assert "UsageError" in err and "No xdask server answers at http://127.0.0.1:1" in err
    assert "Traceback" not in out + err
    assert connection.current_client().endpoint == server.endpoint


def test_help_and_dashboard(ip, server, capsys, monkeypatch) -> None:
    connection.connect(server.endpoint)
    # A terminal shell renders only text/plain; a notebook's renders the IFrame's HTML.
    monkeypatch.setattr(ip.display_formatter, "active_types", ["text/plain", "text/html"])
    out, _ = _cell(ip, "%xdask help", capsys)
    assert "%xdask connect" in out and "%%chat UID" in out and "launch" in out

    out, _ = _cell(ip, "%xdask launch --help", capsys)
    assert "--model-name" in out and "%xdask launch" in out

    with capture_output() as captured:
        ip.run_line_magic("xdask", "dashboard --height 400")
    html = captured.outputs[0].data["text/html"]
    assert f'src="{server.endpoint}/dashboard"' in html and 'height="400"' in html
    with capture_output() as captured:
        ip.run_line_magic("xdask", "dashboard --proxy")
    assert 'src="/xdask/dashboard"' in captured.outputs[0].data["text/html"]
