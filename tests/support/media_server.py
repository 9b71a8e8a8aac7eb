"""A module's own ``xdask-local`` for the image and audio tests, with an HTTP and an ``openai`` client.

Why not the session's server: these modules set server settings of their own
(a short image retention), and every server here runs with
``OMP_NUM_THREADS=1``: on this 2-core machine shared with other jobs, torch's
two spinning threads made the tiny Whisper 10-30x slower than one thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from support.servers import LocalServer


@dataclass
class MediaServer:
    server: LocalServer
    http: httpx.Client
    openai: Any


@contextlib.contextmanager
def media_server(home: Path, **env: str) -> Iterator[MediaServer]:
    """Start ``xdask-local`` on ``home`` with ``env`` (``XDASK_*`` settings) and stop it afterwards."""
    import openai

    srv = LocalServer(home, extra_env={"OMP_NUM_THREADS": "1", **env})
    try:
        with httpx.Client(base_url=srv.endpoint, timeout=300) as http, \
                openai.OpenAI(base_url=f"{srv.endpoint}/v1", api_key="x", max_retries=0, timeout=300) as oai:
            yield MediaServer(srv, http, oai)
    finally:
        srv.stop()
