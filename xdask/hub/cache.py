"""The model cache under ``XDASK_HOME/cache``: one folder per spec, complete or not.

A folder counts as a model only once its manifest (``MANIFEST``) exists: the
downloader writes the manifest last, atomically, so a download that failed,
was cancelled or was killed leaves a folder without one, which a later launch
resumes or replaces and never takes as complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from typing import Any

from xdask import config

#: The file that marks a cache folder complete (JSON: what it holds and where it came from).
MANIFEST = ".xdask-complete.json"


def cache_root() -> pathlib.Path:
    """``XDASK_HOME/cache`` (this machine's; every worker has its own)."""
    return config.home() / "cache"


def is_complete(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a finished model (its manifest exists)."""
    return (folder / MANIFEST).is_file()


def read_manifest(folder: pathlib.Path) -> dict[str, Any] | None:
    """The manifest of a complete folder, or None (missing or unreadable)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mark_complete(folder: pathlib.Path, info: dict[str, Any]) -> None:
    """Write ``folder``'s manifest atomically: the last step of a successful fetch.

    ``info`` should name ``model_name``, ``model_format``,
    ``model_size_in_billions``, ``quantization``, ``hub``, ``model_id``,
    ``revision`` and ``files`` (paths relative to ``folder``); the time is added.
    """
    folder.mkdir(parents=True, exist_ok=True)
    body = {**info, "completed_at": time.time()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MANIFEST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
        os.replace(tmp, folder / MANIFEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
