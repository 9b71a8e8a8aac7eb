"""Generated images behind ``response_format="url"``: PNG files under ``XDASK_HOME/images``, kept for a while.

The server (not the worker) keeps them: workers may be on other hosts, and
the server is what the URL points at. Names are random (``<32 hex>.png``),
so a link is as private as the image. Retention (``xdask.image``): a file
is served for ``retention-seconds`` after it was written; a cleanup every
``cleanup-interval`` seconds deletes expired files and the oldest beyond
``max-files``. Several servers may share one home: each cleans up by the
files' own times, so they agree.

Examples
--------
>>> store = ImageStore(pathlib.Path("/tmp/xd-images"), retention=60, max_files=10)   # doctest: +SKIP
>>> name = store.save(png_bytes)
>>> store.path(name).read_bytes() == png_bytes
True
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import re
import time
import uuid

from xdask import config

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[0-9a-f]{32}\.png$")


class ImageStore:
    """PNG files with a retention time and a count limit, cleaned up periodically."""

    def __init__(self, folder: pathlib.Path, retention: float, max_files: int, interval: float = 60.0):
        self.folder = folder
        self.retention = float(retention)
        self.max_files = int(max_files)
        self.interval = float(interval)
        self._task: asyncio.Task | None = None

    @classmethod
    def from_config(cls) -> ImageStore:
        """The store of ``xdask.home`` with the ``xdask.image`` retention settings."""
        return cls(config.home() / "images", float(config.get("image.retention-seconds")),
                   int(config.get("image.max-files")), float(config.get("image.cleanup-interval")))

    def save(self, data: bytes) -> str:
        """Write one PNG (atomically: a reader never sees half a file) and return its name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.png"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)
        return name

    def path(self, name: str) -> pathlib.Path | None:
        """The file of ``name`` while it is retained; None for a bad, unknown or expired name."""
        if not _NAME_RE.match(name):
            return None
        path = self.folder / name
        try:
            written = path.stat().st_mtime
        except OSError:
            return None
        return path if time.time() - written <= self.retention else None

    def read(self, name: str) -> bytes | None:
        """The bytes of ``name`` while it is retained; None otherwise (also when a cleanup just took it)."""
        path = self.path(name)
        try:
            return path.read_bytes() if path is not None else None
        except FileNotFoundError:
            return None

    def cleanup(self, now: float | None = None) -> int:
        """Delete expired files and the oldest beyond ``max_files`` (and stale temporaries); how many went."""
        now = time.time() if now is None else now
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                with contextlib.suppress(OSError):
                    entries.append((entry.stat().st_mtime, entry.name))
        doomed = {name for written, name in entries if now - written > self.retention}
        images = sorted((e for e in entries if _NAME_RE.match(e[1])), reverse=True)  # newest first
        doomed.update(name for _, name in images[self.max_files:])
        removed = 0
        for name in doomed:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
                removed += 1
        if removed:
            logger.debug("Image cleanup removed %d file(s) from %s", removed, self.folder)
        return removed

    def start(self) -> None:
        """Clean up every ``interval`` seconds on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xdask-image-cleanup")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.cleanup)
            except Exception:
                logger.exception("Image cleanup failed")
            await asyncio.sleep(self.interval)
