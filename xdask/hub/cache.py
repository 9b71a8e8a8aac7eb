"""The model cache under ``XDASK_HOME/cache``: one folder per spec, complete or not.

A folder counts as a model only once its manifest (``MANIFEST``) exists: the
downloader writes the manifest last, atomically, so a download that failed,
was cancelled or was killed leaves a folder without one, which a later launch
resumes or replaces and never takes as complete.

``list_cached`` and ``remove_cached`` serve ``xdask cached`` and
``xdask remove-cache`` (``GET``/``DELETE /v1/cache/models``); the supervisor
runs them on every worker, since each machine has its own cache. A folder is
named by its ``model_version`` (its folder name), the id used for removal.

Examples
--------
>>> from xdask.hub.cache import list_cached, remove_cached      # doctest: +SKIP
>>> [(e["model_version"], e["size_bytes"], e["complete"]) for e in list_cached()]  # doctest: +SKIP
[('gemma-3-270m-ggufv2-0_27b-Q4_K_M', 253116416, True)]
>>> remove_cached("gemma-3-270m-ggufv2-0_27b-Q4_K_M")[0]  # doctest: +SKIP
'/root/.xdask/cache/gemma-3-270m-ggufv2-0_27b-Q4_K_M'
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
import time
import uuid
from typing import Any

from xdask import config
from xdask.errors import InvalidRequestError, NotFoundError

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


# -- listing and removal (``xdask cached``, ``xdask remove-cache``) ------------------

#: ``<name>-<format>-<size>b-<quant>``: what ``locate.cache_dir`` names a folder
#: (model names hold dashes; formats, sizes and quantizations do not).
_FOLDER_NAME = re.compile(r"^(?P<name>.+)-(?P<format>[^-]+)-(?P<size>[^-]+)b-(?P<quant>[^-]+)$")

#: Prefix of a folder being removed: renamed first, so no reader sees it half deleted.
_REMOVING = ".removing-"


def disk_usage(path: pathlib.Path) -> int:
    """Bytes ``path`` takes on disk (``du``: allocated blocks, partial files included)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in (*files, *dirs):
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed while we walk
                continue
            blocks = getattr(st, "st_blocks", None)
            total += blocks * 512 if blocks is not None else st.st_size
    return total


def check_model_version(model_version: str) -> str:
    """``model_version`` if it names a folder directly under the cache, else 400.

    Why: it comes from an HTTP query; ``../x`` or ``a/b`` must never reach a
    path join that is then removed.
    """
    if (
        not isinstance(model_version, str)
        or not model_version
        or model_version in (".", "..")
        or model_version.startswith(".")
        or any(c in model_version for c in ("/", "\\", "\0"))
        or ".." in model_version
    ):
        raise InvalidRequestError(
            f"Invalid model_version {model_version!r}: expected a cache folder name such as "
            "'gemma-3-270m-ggufv2-0_27b-Q4_K_M' (see `xdask cached`)",
            param="model_version",
        )
    return model_version


def describe_cached(folder: pathlib.Path) -> dict[str, Any]:
    """One cache folder as ``list_cached`` reports it.

    A folder without its manifest is listed with ``complete: False`` (a
    download in progress, failed or killed), its facts read from its name.
    """
    manifest = read_manifest(folder) or {}
    parsed = _FOLDER_NAME.match(folder.name)
    guess = parsed.groupdict() if parsed else {}
    return {
        "model_version": folder.name,
        "model_name": manifest.get("model_name", guess.get("name", folder.name)),
        "model_format": manifest.get("model_format", guess.get("format")),
        "model_size_in_billions": manifest.get("model_size_in_billions", guess.get("size")),
        "quantization": manifest.get("quantization", guess.get("quant")),
        "hub": manifest.get("hub"),
        "model_id": manifest.get("model_id"),
        "revision": manifest.get("revision"),
        "size_bytes": disk_usage(folder),
        "path": str(folder),
        "real_path": str(folder.resolve()),
        "complete": is_complete(folder),
        "completed_at": manifest.get("completed_at"),
    }


def list_cached(model_name: str | None = None) -> list[dict[str, Any]]:
    """Every model folder in this machine's cache, complete or not, sorted by name.

    ``model_name`` keeps only that family's folders.
    """
    root = cache_root()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        entry = describe_cached(folder)
        if model_name is None or entry["model_name"] == model_name:
            out.append(entry)
    return out


def remove_cached(model_version: str) -> list[str]:
    """Delete the cache folder ``model_version``; returns the removed paths (404 if absent).

    The folder is renamed before it is deleted, so a reader (a launch, a
    listing, another worker sharing this disk) sees it whole or not at all.
    """
    check_model_version(model_version)
    root = cache_root()
    folder = root / model_version
    if not folder.is_dir():
        raise NotFoundError(f"No cached model {model_version!r} in {root}", param="model_version")
    paths = [str(folder)] + sorted(str(p) for p in folder.rglob("*"))
    trash = root / f"{_REMOVING}{model_version}-{uuid.uuid4().hex[:8]}"
    try:
        folder.rename(trash)
    except FileNotFoundError:  # another process sharing this cache removed it first
        raise NotFoundError(f"No cached model {model_version!r} in {root}", param="model_version") from None
    shutil.rmtree(trash, ignore_errors=True)
    return paths
