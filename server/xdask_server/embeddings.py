"""HTTP binding of ``POST /v1/embeddings`` (OpenAI) and ``POST /v1/rerank`` (Xinference/Cohere).

Handlers only parse, call ``RetrievalServing`` and write; a client that
hangs up cancels the wait (the model finishes the batch it is in and the
answer is dropped).

Examples
--------
>>> import openai                                                          # doctest: +SKIP
>>> oai = openai.OpenAI(base_url="http://127.0.0.1:9997/v1", api_key="x")
>>> oai.embeddings.create(model="all-MiniLM-L6-v2", input=["hello"]).data[0].embedding[:2]
[-0.034..., 0.031...]
"""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic

from xdask.protocol import EmbeddingRequest, RerankRequest
from xdask_server.handlers import BodyHandler
from xdask_server.retrieval import RetrievalServing


class _RetrievalHandler(BodyHandler):
    """POST a validated body to one ``RetrievalServing`` method; cancelled when the client hangs up."""

    schema: type[pydantic.BaseModel]
    method: str

    @property
    def retrieval(self) -> RetrievalServing:
        return self.application.settings["retrieval"]

    def on_connection_close(self) -> None:
        super().on_connection_close()
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()

    async def post(self) -> None:
        req: Any = self.parse(self.schema)
        self._task = asyncio.ensure_future(getattr(self.retrieval, self.method)(req))
        try:
            body = await self._task
        except asyncio.CancelledError:
            return  # the client hung up
        self.write_json(body)


class EmbeddingsHandler(_RetrievalHandler):
    """``POST /v1/embeddings``."""

    schema = EmbeddingRequest
    method = "embed"


class RerankHandler(_RetrievalHandler):
    """``POST /v1/rerank``."""

    schema = RerankRequest
    method = "rerank"


def routes() -> list[tuple[str, type[BodyHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [(r"/v1/embeddings", EmbeddingsHandler), (r"/v1/rerank", RerankHandler)]
