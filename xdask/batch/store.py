"""Files and batch state of the OpenAI Batch API on disk, under ``XDASK_HOME/batches``.

Why on disk and not in the scheduler: a batch outlives the server that took
it. A restarted server reloads every batch from here and resumes the ones
that were running, skipping the requests whose outcome is already written.

Layout::

    batches/files/<file_id>.jsonl    the bytes of an uploaded file, or of a batch's output/error file
    batches/files/<file_id>.json     its OpenAI ``file`` object (written last: a file exists once it has one)
    batches/jobs/<batch_id>.json     a batch's state (its OpenAI ``batch`` object and the ids it reserved)

A batch's output and error files grow under their reserved ids while it
runs, one append per finished chunk; they get their ``file`` object when the
batch ends. The lines already there are the resume point: each names its
``custom_id`` (or, for a line that could not be parsed, its line number),
and a torn last line, left by a crash mid-append, is cut off on reload.

Every method does blocking file IO: the server calls them through
``asyncio.to_thread``. State files are replaced atomically (``os.replace``).

Examples
--------
>>> store = BatchStore(pathlib.Path("/tmp/xd/batches"))          # doctest: +SKIP
>>> upload = store.new_upload()
>>> upload.write(b'{"custom_id": "a", ...}\\n')
>>> meta = store.commit_upload(upload, "in.jsonl", "batch")
>>> meta["id"], meta["bytes"]
('file-0006...', 24)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO


def new_id(prefix: str) -> str:
    """An OpenAI-style id whose hex part sorts in creation order (microseconds, then random).

    Sortable ids make the lists' ``after`` cursors and newest-first order one
    comparison, with no second index to keep.
    """
    return f"{prefix}{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


def _write_atomic(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: pathlib.Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Upload:
    """A file being received: bytes go to a hidden temporary file beside the stored ones."""

    path: pathlib.Path
    handle: BinaryIO
    size: int = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.size += len(data)


@dataclass
class Progress:
    """What a batch's output and error files already hold: the resume point."""

    #: ``custom_id`` of each finished request, or ``"line:<n>"`` for an input line with no usable custom_id.
    done: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def line_key(custom_id: str | None, line: int | None) -> str:
    """The key that marks one input line as done (``custom_id`` is unique within a batch)."""
    return custom_id if custom_id is not None else f"line:{line}"


class BatchStore:
    """The ``batches`` folder: uploaded files, outputs and batch states."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.files_dir = root / "files"
        self.jobs_dir = root / "jobs"

    def ensure(self) -> None:
        """Create the folders and remove uploads a crash left half-written."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.files_dir.glob(".upload-*"):
            stale.unlink(missing_ok=True)

    # -- files -----------------------------------------------------------------

    def data_path(self, file_id: str) -> pathlib.Path:
        return self.files_dir / f"{file_id}.jsonl"

    def new_upload(self) -> Upload:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        path = self.files_dir / f".upload-{secrets.token_hex(8)}"
        return Upload(path, path.open("wb"))

    def discard_upload(self, upload: Upload) -> None:
        upload.handle.close()
        upload.path.unlink(missing_ok=True)

    def commit_upload(self, upload: Upload, filename: str, purpose: str) -> dict[str, Any]:
        """Keep an upload as a file; its ``file`` object."""
        upload.handle.close()
        file_id = new_id("file-")
        os.replace(upload.path, self.data_path(file_id))
        return self._describe(file_id, filename, purpose)

    def publish(self, file_id: str, filename: str, purpose: str) -> dict[str, Any]:
        """Give a batch's output or error file (already written under ``file_id``) its ``file`` object."""
        return self._describe(file_id, filename, purpose)

    def _describe(self, file_id: str, filename: str, purpose: str) -> dict[str, Any]:
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": self.data_path(file_id).stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        _write_atomic(self.files_dir / f"{file_id}.json", meta)
        return meta

    def load_files(self) -> list[dict[str, Any]]:
        """Every stored ``file`` object."""
        metas = (_read_json(p) for p in self.files_dir.glob("file-*.json"))
        return [m for m in metas if isinstance(m, dict) and "id" in m]

    def delete_file(self, file_id: str) -> None:
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)  # first: gone for readers at once
        self.data_path(file_id).unlink(missing_ok=True)

    def read_chunk(self, file_id: str, offset: int, size: int) -> bytes:
        with self.data_path(file_id).open("rb") as f:
            f.seek(offset)
            return f.read(size)

    # -- batches ---------------------------------------------------------------

    def save_batch(self, state: dict[str, Any]) -> None:
        _write_atomic(self.jobs_dir / f"{state['batch']['id']}.json", state)

    def load_batches(self) -> list[dict[str, Any]]:
        states = (_read_json(p) for p in self.jobs_dir.glob("batch_*.json"))
        return [s for s in states if isinstance(s, dict) and isinstance(s.get("batch"), dict)]

    def append(self, file_id: str, lines: list[dict[str, Any]]) -> None:
        """Append JSONL lines in one write (a crash can tear only the last of them)."""
        if lines:
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            with self.data_path(file_id).open("ab") as f:
                f.write(data)

    def progress(self, output_id: str, error_id: str) -> Progress:
        """Read a batch's output and error files back (cutting a torn last line off each)."""
        prog = Progress()
        for file_id, is_error in ((output_id, False), (error_id, True)):
            for line in self._complete_lines(self.data_path(file_id)):
                err = line.get("error") or {}
                prog.done.add(line_key(line.get("custom_id"), err.get("line")))
                if is_error:
                    prog.failed += 1
                    continue
                prog.completed += 1
                usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
                prog.input_tokens += int(usage.get("prompt_tokens") or 0)
                prog.output_tokens += int(usage.get("completion_tokens") or 0)
        return prog

    @staticmethod
    def _complete_lines(path: pathlib.Path) -> list[dict[str, Any]]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn append: its requests run again
            with path.open("r+b") as f:
                f.truncate(end)
        out = []
        for raw in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out
