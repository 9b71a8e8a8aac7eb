"""Tornado handlers of OpenAI's Files and Batch APIs: HTTP binding only; the logic is ``xdask.batch.api``.

``POST /v1/files`` streams its multipart body to disk as it arrives (a batch
file may be 200 MB: it is never held in memory, and each write happens in a
thread), capped at ``xdask.batch-api.max-file-size`` (413 beyond).

Examples
--------
>>> import openai                                                     # doctest: +SKIP
>>> client = openai.OpenAI(base_url="http://127.0.0.1:9997/v1", api_key="unused")
>>> f = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
>>> batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
>>> client.batches.retrieve(batch.id).status
'in_progress'
"""

from __future__ import annotations

import asyncio
import contextlib
from email.message import Message
from typing import Any

from tornado import web

from xdask import config
from xdask.api.batch import CreateBatchRequest
from xdask.batch.api import BatchManager
from xdask.batch.store import Upload
from xdask.errors import InvalidRequestError, PayloadTooLargeError, XdaskError
from xdask_server.base import _REFUSE_UNREAD_FACTOR, BaseHandler

#: Bytes of multipart framing allowed on top of the file itself (boundaries, headers, the purpose field).
_FRAMING = 1 << 20

#: Bytes a file's content is sent in.
_CONTENT_CHUNK = 1 << 20


class MultipartReader:
    """A streaming ``multipart/form-data`` parser: the ``file`` part's bytes as they come, small fields kept.

    Why not Tornado's ``parse_body_arguments``: it needs the whole body in
    memory, several copies of it, on the event loop.

    Examples
    --------
    >>> r = MultipartReader(b"xx")
    >>> r.feed(b'--xx\\r\\nContent-Disposition: form-data; name="purpose"\\r\\n\\r\\nbatch\\r\\n--xx\\r\\n'
    ...        b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\\r\\n\\r\\n{}\\n\\r\\n--xx--\\r\\n')
    [b'{}\\n']
    >>> r.fields, r.filename, r.done
    ({'purpose': 'batch'}, 'a.jsonl', True)
    """

    def __init__(self, boundary: bytes, file_field: str = "file", max_field: int = 65536, max_headers: int = 16384):
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # the first boundary has no line break before it: give it one
        self._state = "preamble"
        self._file_field = file_field
        self._max_field = max_field
        self._max_headers = max_headers
        self._part: str | None = None  # the field being read; "" while the file is
        self._value = bytearray()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        """The file's bytes found in ``data`` and what was buffered before (fields are kept aside)."""
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._state in ("preamble", "body"):
                idx = self._buf.find(self._delim)
                if idx < 0:  # keep what could be the start of a delimiter
                    self._take(len(self._buf) - len(self._delim) + 1, out)
                    return out
                self._take(idx, out)
                del self._buf[:len(self._delim)]
                self._end_part()
                self._state = "after"
            elif self._state == "after":
                if len(self._buf) < 2:
                    return out
                if self._buf[:2] == b"--":
                    self._state, self.done = "done", True
                    continue
                end = self._buf.find(b"\r\n")
                if end < 0 or self._buf[:end].strip(b" \t"):
                    if end < 0 and len(self._buf) < 256:
                        return out
                    raise InvalidRequestError("Malformed multipart body: bad boundary line")
                del self._buf[:end + 2]
                self._state = "headers"
            elif self._state == "headers":
                end = 0 if self._buf[:2] == b"\r\n" else self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > self._max_headers:
                        raise InvalidRequestError("Malformed multipart body: part headers too long")
                    return out
                self._start_part(bytes(self._buf[:end]))
                del self._buf[:end + (2 if end == 0 else 4)]
                self._state = "body"
            else:  # done: the epilogue is ignored
                self._buf.clear()
                return out

    def _take(self, n: int, out: list[bytes]) -> None:
        if n <= 0:
            return
        if self._state == "body":
            if self._part == "":
                out.append(bytes(self._buf[:n]))
            elif self._part is not None:
                self._value += self._buf[:n]
                if len(self._value) > self._max_field:
                    raise InvalidRequestError(f"Form field {self._part!r} is too long", param=self._part)
        del self._buf[:n]

    def _start_part(self, raw: bytes) -> None:
        msg = Message()
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            header, sep, value = line.partition(":")
            if sep and header.strip().lower() == "content-disposition":
                msg["content-disposition"] = value.strip()
        param = msg.get_param("name", header="content-disposition")
        filename = msg.get_filename()
        name = param if isinstance(param, str) else None
        if name == self._file_field and filename is not None and self.filename is None:
            self._part, self.filename = "", filename or "upload.jsonl"
        elif filename is None and name:
            self._part = name
        else:
            self._part = None  # another file part: skipped
        self._value = bytearray()

    def _end_part(self) -> None:
        if self._state == "body" and self._part:
            self.fields[self._part] = self._value.decode("utf-8", "replace")
        self._part = None


def _boundary(content_type: str) -> bytes:
    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if msg.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise InvalidRequestError("Upload a file as multipart/form-data with a 'file' and a 'purpose' field")
    return boundary.encode("latin-1")


class BatchBaseHandler(BaseHandler):
    """What the Files and Batch handlers share: the manager, loaded from disk before any answer."""

    @property
    def batches(self) -> BatchManager:
        return self.application.settings["batches"]

    async def prepare(self) -> None:
        BaseHandler.prepare(self)  # the body cap (these routes take no body)
        await self.batches.ready()

    def int_arg(self, name: str, default: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise InvalidRequestError(f"{name} must be an integer", param=name) from None


@web.stream_request_body
class FilesHandler(BatchBaseHandler):
    """``POST /v1/files`` (multipart: ``file``, ``purpose="batch"``) stores a file; ``GET /v1/files`` lists them."""

    _upload: Upload | None = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        self._limit = int(config.get("batch-api.max-file-size"))
        self._reader = MultipartReader(_boundary(self.request.headers.get("Content-Type", "")))
        self._too_large = False
        self._error: XdaskError | None = None
        cap = self._limit * _REFUSE_UNREAD_FACTOR + _FRAMING
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise PayloadTooLargeError(f"File upload of {length} bytes is over the limit of {self._limit}")
        self.request.connection.set_max_body_size(cap)  # type: ignore[union-attr]
        self._upload = await asyncio.to_thread(self.batches.store.new_upload)

    async def data_received(self, chunk: bytes) -> None:
        if self._upload is None or self._error is not None:
            return
        try:
            pieces = self._reader.feed(chunk)
        except XdaskError as exc:
            self._error = exc
            return
        size = sum(len(p) for p in pieces)
        if self._too_large or self._upload.size + size > self._limit:
            self._too_large = True  # keep reading (so the client gets our answer) but keep nothing
            return
        if pieces:
            try:
                await asyncio.to_thread(self._upload.write, b"".join(pieces))
            except (OSError, ValueError) as exc:
                self._error = XdaskError(f"Could not store the upload: {exc}")

    async def post(self) -> None:
        upload, self._upload = self._upload, None
        assert upload is not None
        reader = self._reader
        try:
            if self._too_large:
                raise PayloadTooLargeError(f"The file is over the limit of {self._limit} bytes "
                                           "(xdask.batch-api.max-file-size)", param="file")
            if self._error is not None:
                raise self._error
            if not reader.done:
                raise InvalidRequestError("Malformed multipart body: it ends before its closing boundary")
            purpose = reader.fields.get("purpose")
            if not purpose:
                raise InvalidRequestError("purpose is required", param="purpose")
            if purpose != "batch":
                raise InvalidRequestError(f"purpose {purpose!r} is not supported: xdask stores files for the "
                                          "Batch API only (purpose 'batch')", param="purpose")
            if reader.filename is None:
                raise InvalidRequestError("file is required: a multipart part named 'file' with a filename",
                                          param="file")
        except XdaskError:
            await asyncio.to_thread(self.batches.store.discard_upload, upload)
            raise
        self.write_json(await self.batches.add_file(upload, reader.filename, purpose))

    def on_connection_close(self) -> None:
        super().on_connection_close()
        upload, self._upload = self._upload, None
        if upload is not None:  # the client hung up mid-upload
            task = asyncio.ensure_future(asyncio.to_thread(self.batches.store.discard_upload, upload))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def get(self) -> None:
        self.write_json(self.batches.list_files(
            purpose=self.get_query_argument("purpose", None) or None,
            after=self.get_query_argument("after", None) or None,
            limit=self.int_arg("limit", 10_000),
            order=self.get_query_argument("order", "desc"),
        ))


class FileHandler(BatchBaseHandler):
    """``GET``/``DELETE /v1/files/{file_id}``."""

    async def get(self, file_id: str) -> None:
        self.write_json(self.batches.get_file(file_id))

    async def delete(self, file_id: str) -> None:
        self.write_json(await self.batches.delete_file(file_id))


class FileContentHandler(BatchBaseHandler):
    """``GET /v1/files/{file_id}/content``: the bytes, read and sent a chunk at a time."""

    async def get(self, file_id: str) -> None:
        self.batches.get_file(file_id)
        store = self.batches.store
        self.set_header("Content-Type", "application/octet-stream")
        offset = 0
        while True:
            data = await asyncio.to_thread(store.read_chunk, file_id, offset, _CONTENT_CHUNK)
            if not data:
                break
            self.write(data)
            offset += len(data)
            with contextlib.suppress(Exception):
                await self.flush()
        self.finish()


class BatchesHandler(BatchBaseHandler):
    """``POST /v1/batches`` creates a batch; ``GET /v1/batches?after=&limit=`` lists them, newest first."""

    async def prepare(self) -> None:
        BaseHandler.prepare(self)
        await self.batches.ready()

    async def post(self) -> None:
        self.write_json(await self.batches.create(self.parse(CreateBatchRequest)))

    async def get(self) -> None:
        self.write_json(self.batches.list_batches(after=self.get_query_argument("after", None) or None,
                                                  limit=self.int_arg("limit", 20)))


class BatchHandler(BatchBaseHandler):
    """``GET /v1/batches/{batch_id}``."""

    async def get(self, batch_id: str) -> None:
        self.write_json(self.batches.get(batch_id))


class BatchCancelHandler(BatchBaseHandler):
    """``POST /v1/batches/{batch_id}/cancel``: ``cancelling`` now, ``cancelled`` once running chunks stop."""

    async def post(self, batch_id: str) -> None:
        self.write_json(await self.batches.cancel(batch_id))


def routes() -> list[tuple[str, Any]]:
    """The Files and Batch API routes."""
    ident = r"([^/]+)"
    return [
        (r"/v1/files", FilesHandler),
        (rf"/v1/files/{ident}", FileHandler),
        (rf"/v1/files/{ident}/content", FileContentHandler),
        (r"/v1/batches", BatchesHandler),
        (rf"/v1/batches/{ident}", BatchHandler),
        (rf"/v1/batches/{ident}/cancel", BatchCancelHandler),
    ]
