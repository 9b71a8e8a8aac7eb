"""The ``xdask`` commands, run as subprocesses against the xdask-local server."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def xdask(server, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "xdask.cli", *args, "--endpoint", server.endpoint],
        input=stdin, capture_output=True, text=True, timeout=300, env=server.env,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_launch_list_chat_generate_terminate(server):
    out = xdask(server, "launch", "--model-engine", "llama.cpp", "-n", "gemma-3-270m", "-f", "ggufv2",
                "-q", "Q4_K_M", "-u", "cli-model").stdout
    assert "Model uid: cli-model" in out

    listing = xdask(server, "list").stdout
    assert "cli-model" in listing and "gemma-3-270m" in listing and "ready" in listing

    answer = xdask(server, "generate", "-u", "cli-model", "-p", "1, 2, 3, 4, 5,", "--max-tokens", "4",
                   "--temperature", "0").stdout
    assert answer.startswith(" 6")

    one_shot = xdask(server, "chat", "-u", "cli-model", "-p", "Hello!", "--max-tokens", "12").stdout
    assert one_shot.strip()

    # Interactive: two questions on stdin, then EOF; each gets a streamed answer.
    session = xdask(server, "chat", "-u", "cli-model", "--max-tokens", "8", "--temperature", "0",
                    stdin="Hi!\nWhat is 2 + 2?\n").stdout
    assert len([line for line in session.splitlines() if line.strip()]) >= 2

    assert "Terminated cli-model" in xdask(server, "terminate", "--model-uid", "cli-model").stdout
    assert "cli-model" not in xdask(server, "list").stdout


def test_registrations(server):
    out = xdask(server, "registrations", "-t", "LLM").stdout
    assert "gemma-3-270m" in out and "chat" in out


def test_errors_are_reported_not_tracebacks(server):
    proc = xdask(server, "terminate", "--model-uid", "never-launched", check=False)
    assert proc.returncode != 0
    assert "not found" in proc.stderr.lower() and "Traceback" not in proc.stderr
    proc = xdask(server, "launch", "-n", "no-such-model", check=False)
    assert proc.returncode != 0 and "not registered" in proc.stderr


def test_unreachable_endpoint_is_a_clear_error(server):
    proc = subprocess.run([sys.executable, "-m", "xdask.cli", "list", "-e", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
