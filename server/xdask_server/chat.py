"""HTTP binding of ``POST /v1/chat/completions`` and ``POST /v1/completions``: a JSON answer or an SSE stream.

The handlers parse the body, look the model's record up once, and write what
``serving.OpenAIServing`` returns; a client that hangs up cancels the
request's task, which closes the comm to the worker and so stops the
generation there.

Examples
--------
>>> import openai                                                          # doctest: +SKIP
>>> oai = openai.OpenAI(base_url="http://127.0.0.1:9997/v1", api_key="x")
>>> for chunk in oai.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi"}],
...                                           stream=True):
...     print(chunk.choices[0].delta.content or "", end="")
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from tornado import web
from tornado.iostream import StreamClosedError

from xdask.api.chat import ChatCompletionRequest, CompletionRequest
from xdask.errors import XdaskError
from xdask_server.base import TaskHandler
from xdask_server.serving import OpenAIServing


def _event(data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class GenerationHandler(TaskHandler):
    """Shared POST logic of chat and completions."""

    schema: type[ChatCompletionRequest | CompletionRequest]

    @property
    def serving(self) -> OpenAIServing:
        return self.application.settings["serving"]

    async def post(self) -> None:
        req = self.parse(self.schema)
        record = await self.supervisor.record(req.model)
        if req.stream:
            await self.run(self._stream(self.serving.stream(req, record)))
            return
        done, body = await self.run(self.serving.complete(req, record))
        if done:
            self.write_json(body)

    async def _stream(self, chunks: AsyncGenerator[dict[str, Any], None]) -> None:
        try:
            first = await anext(chunks)  # errors before the first byte are plain HTTP errors
        except StopAsyncIteration:
            first = None
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        try:
            if first is not None:
                self.write(_event(first))
                await self.flush()
            try:
                async for chunk in chunks:
                    self.write(_event(chunk))
                    await self.flush()
            except XdaskError as exc:  # mid-stream: report in-band, as OpenAI does
                self.write(_event(exc.to_dict()))
            self.write(b"data: [DONE]\n\n")
            self.finish()
        except StreamClosedError:
            pass  # the client hung up; closing `chunks` cancels generation
        finally:
            await chunks.aclose()


class ChatCompletionsHandler(GenerationHandler):
    """``POST /v1/chat/completions``."""

    schema = ChatCompletionRequest


class CompletionsHandler(GenerationHandler):
    """``POST /v1/completions``."""

    schema = CompletionRequest


def routes() -> list[tuple[str, type[web.RequestHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [(r"/v1/chat/completions", ChatCompletionsHandler), (r"/v1/completions", CompletionsHandler)]
