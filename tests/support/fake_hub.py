"""A fake Hugging Face hub (and the part of ModelScope's API a download uses) on 127.0.0.1.

It answers what ``huggingface_hub`` calls to fetch files, read from its
source (2.4): ``GET /api/models/{repo}[/revision/{rev}]`` (``sha`` and
``siblings``), and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with
``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS
files (the ETag is then the file's SHA-256, as on the real hub),
``Content-Length`` and ``Range`` (206). Errors carry the real hub's
``X-Error-Code`` headers (``RepoNotFound``, ``EntryNotFound``,
``GatedRepo``), which is how the client picks its exception classes.

For ModelScope (``MODELSCOPE_ENDPOINT``): ``GET /api/v1/models/{repo}/repo/files``
(``{"Code": 200, "Data": {"Files": [...]}}``) and
``GET /api/v1/models/{repo}/repo?Revision=&FilePath=`` with ``Range``.

Switches for tests: ``gated`` (repos answering 401 GatedRepo), ``tokens``
(when set, an ``Authorization`` with another token gets 401 "Invalid
credentials"), ``drop_once`` (path -> bytes after which the connection is cut,
once), ``corrupt`` (paths served with wrong bytes), ``chunk_delay`` (seconds between chunks of a file body), and the
records ``requests`` (method, path, Range header) and ``bytes_sent`` per
file path, to prove what was fetched.

Examples
--------
>>> hub = FakeHub().start()                                   # doctest: +SKIP
>>> hub.add_repo("acme/tiny", {"config.json": b"{}", "model.safetensors": b"..."})
>>> os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: Files the real hub stores with Git LFS (their ETag is their SHA-256).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx")


class FakeRepo:
    """One repo: files (name -> bytes), a commit sha, and each file's ETag."""

    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id = repo_id
        self.files = dict(files)
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha1(files[name]).digest())
        self.sha = digest.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else hashlib.sha1(data).hexdigest()


class FakeHub:
    """The server and its switches; ``start()`` serves on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.gated: set[str] = set()
        self.tokens: set[str] | None = None
        self.drop_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.chunk_delay = 0.0
        self.chunk_size = 16384
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_sent: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- set up -------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path]) -> FakeRepo:
        data = {name: (v.read_bytes() if isinstance(v, Path) else v) for name, v in files.items()}
        repo = FakeRepo(repo_id, data)
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> FakeRepo:
        """A repo holding every file of ``folder`` (top level), plus ``extra``."""
        files: dict[str, bytes | Path] = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        files.update(extra or {})
        return self.add_repo(repo_id, files)

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- what happened ----------------------------------------------------------------

    def reset_records(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_sent.clear()

    def file_requests(self, method: str = "GET") -> list[tuple[str, str | None]]:
        """(file path, Range) of every file body request (HF resolve or ModelScope repo?FilePath=)."""
        return [(p, r) for m, p, r in self.requests if m == method and p.startswith("file:")]

    def files_fetched(self) -> set[str]:
        """``repo/file`` of each file whose body was requested at least once."""
        return {p[len("file:"):] for p, _ in self.file_requests()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # -- routing --------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        rng = self.headers.get("Range")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            self._record(head, f"api:{m.group(1)}", rng)
            return self._model_info(m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo_id, _rev, name = m.groups()
            self._record(head, f"file:{repo_id}/{name}", rng)
            return self._file(repo_id, name, head, hf=True)
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path)
        if m:
            self._record(head, f"msapi:{m.group(1)}", rng)
            return self._ms_files(m.group(1))
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path)
        if m and "FilePath" in query:
            self._record(head, f"file:{m.group(1)}/{query['FilePath']}", rng)
            return self._file(m.group(1), query["FilePath"], head, hf=False)
        self._record(head, f"other:{path}", rng)
        self._error(404, "NotFound", f"no route {path}")

    def _record(self, head: bool, what: str, rng: str | None) -> None:
        with self.fake.lock:
            self.fake.requests.append(("HEAD" if head else "GET", what, rng))

    # -- checks shared by every route -------------------------------------------------------

    def _repo(self, repo_id: str) -> FakeRepo | None:
        auth = self.headers.get("Authorization") or ""
        token = auth.removeprefix("Bearer ").strip() if auth else None
        if self.fake.tokens is not None and token and token not in self.fake.tokens:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404 if token else 401, "RepoNotFound", "Repository not found")
            return None
        if repo_id in self.fake.gated and (self.fake.tokens is None or token not in self.fake.tokens):
            self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it.")
            return None
        return repo

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # -- Hugging Face ----------------------------------------------------------------------

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        self._json({
            "_id": repo.sha[:24], "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
            "gated": repo_id in self.fake.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        })

    # -- files (both hubs) ---------------------------------------------------------------------

    def _file(self, repo_id: str, name: str, head: bool, hf: bool) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist")
        data = repo.files[name]
        start = 0
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
        body = data[start:]
        self.send_response(206 if start else 200)
        etag = repo.etag(name)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", repo.sha)
        if repo.is_lfs(name):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        key = f"{repo_id}/{name}"
        if key in self.fake.corrupt:  # other bytes than the ETag (SHA-256) promises
            body = bytes(b ^ 0xFF for b in body)
        with self.fake.lock:
            cut = self.fake.drop_once.pop(key, None)
        sent = 0
        for i in range(0, len(body), self.fake.chunk_size):
            chunk = body[i:i + self.fake.chunk_size]
            if cut is not None and sent + len(chunk) > cut:
                chunk = chunk[: max(0, cut - sent)]
                self._send(key, chunk)
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
                except OSError:
                    pass
                return
            try:
                self._send(key, chunk)
            except OSError:  # the client went away (a cancel)
                self.close_connection = True
                return
            sent += len(chunk)
            if self.fake.chunk_delay:
                time.sleep(self.fake.chunk_delay)

    def _send(self, key: str, chunk: bytes) -> None:
        self.wfile.write(chunk)
        with self.fake.lock:
            self.fake.bytes_sent[key] += len(chunk)

    # -- ModelScope -------------------------------------------------------------------------------

    def _ms_files(self, repo_id: str) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._json({"Code": 10010205001, "Message": f"model {repo_id} not exists", "Success": False},
                       status=404)
            return
        files = [{"Name": n.rsplit("/", 1)[-1], "Path": n, "Size": len(d), "Type": "blob",
                  "Sha256": hashlib.sha256(d).hexdigest(), "Revision": repo.sha}
                 for n, d in sorted(repo.files.items())]
        self._json({"Code": 200, "Data": {"Files": files}, "Success": True})
