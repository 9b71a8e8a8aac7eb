"""Multipart uploads of the image and audio endpoints: a capped body, parsed into fields and files.

Why not the streaming parser of ``POST /v1/files`` (``batches.MultipartReader``):
it keeps one file part and one value per field, while these forms have
repeated fields (``timestamp_granularities[]``), several file parts
(``image``, ``mask``) and files small enough to hold in memory (25 MB of
audio at most, ``xdask.audio.max-upload-size``). Tornado's parser takes the
whole body, so it runs in a thread, off the event loop.

Examples
--------
>>> form = parse_form("multipart/form-data; boundary=b",
...                   b'--b\\r\\nContent-Disposition: form-data; name="model"\\r\\n\\r\\nw\\r\\n'
...                   b'--b\\r\\nContent-Disposition: form-data; name="file"; filename="a.wav"\\r\\n\\r\\n'
...                   b'RIFF\\r\\n--b--\\r\\n')
>>> form.fields, form.file("file")
({'model': 'w'}, b'RIFF')
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from tornado.httputil import HTTPFile, HTTPInputError, parse_body_arguments

from xdask import config
from xdask.errors import InvalidRequestError
from xdask_server.base import TaskHandler

#: Bytes of multipart framing allowed on top of the file (boundaries, part headers, small fields).
FRAMING = 1 << 20


@dataclass
class Form:
    """A parsed form: text fields (a list for names sent several times or ending in ``[]``) and files."""

    fields: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[HTTPFile]] = field(default_factory=dict)

    def file(self, *names: str, required: bool = True) -> bytes | None:
        """The one file sent under any of ``names``; 400 when it is missing (if required) or repeated."""
        found = [f for name in names for f in self.files.get(name, ())]
        if not found:
            if self.fields.keys() & set(names):
                raise InvalidRequestError(f"{names[0]} must be an uploaded file (a part with a filename), "
                                          "not a text field", param=names[0])
            if required:
                raise InvalidRequestError(f"{names[0]} is required: upload it as a multipart part named "
                                          f"{names[0]!r}", param=names[0])
            return None
        if len(found) > 1:
            raise InvalidRequestError(f"Send one {names[0]} file, not {len(found)}", param=names[0])
        return found[0].body


def parse_form(content_type: str, body: bytes) -> Form:
    """Parse a ``multipart/form-data`` body; 400 for another content type or a malformed body."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequestError("Send this request as multipart/form-data (a file and its fields), "
                                  f"not {content_type.split(';')[0] or 'no content type'}")
    arguments: dict[str, list[bytes]] = {}
    files: dict[str, list[HTTPFile]] = {}
    try:
        parse_body_arguments(content_type, body, arguments, files)
    except HTTPInputError as exc:
        raise InvalidRequestError(f"Malformed multipart body: {exc}") from None
    fields: dict[str, Any] = {}
    for name, values in arguments.items():
        texts = [v.decode("utf-8", "replace") for v in values]
        if name.endswith("[]"):
            fields[name[:-2]] = texts
        else:
            fields[name] = texts if len(texts) > 1 else texts[0]
    return Form(fields, files)


class UploadHandler(TaskHandler):
    """A POST handler whose body is a multipart form with a file of up to ``config.get(limit_key)`` bytes."""

    #: The ``xdask.*`` setting of the largest file this endpoint takes.
    limit_key: str

    def body_limit(self) -> int:
        return int(config.get(self.limit_key)) + FRAMING

    async def form(self) -> Form:
        """The request's form (parsed in a thread: the body may be tens of MB)."""
        body = self.body()
        form = await asyncio.to_thread(parse_form, self.request.headers.get("Content-Type", ""), body)
        self.note_model(form.fields.get("model"))
        return form
