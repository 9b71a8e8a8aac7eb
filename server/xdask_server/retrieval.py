"""HTTP binding of ``POST /v1/embeddings`` (OpenAI) and ``POST /v1/rerank`` (Xinference/Cohere).

Each request looks its model's record up once, is admitted and counted by
the server's statistics (``serving.OpenAIServing``), and is answered by ``xdask.cluster.serving`` (the
functions the batch runner uses too): the model type is checked (400
``wrong_model_type``), one ``invoke`` goes to the least-loaded replica, and
the body is built by ``xdask.api.embeddings``. A client that hangs up
cancels the wait (the model finishes the batch it is in; the answer is
dropped).

Examples
--------
>>> import openai                                                          # doctest: +SKIP
>>> oai = openai.OpenAI(base_url="http://127.0.0.1:9997/v1", api_key="x")
>>> oai.embeddings.create(model="all-MiniLM-L6-v2", input=["hello"]).data[0].embedding[:2]
[-0.034..., 0.031...]
"""

from __future__ import annotations

from tornado import web

from xdask.api.embeddings import EmbeddingRequest, RerankRequest
from xdask_server.base import TaskHandler
from xdask_server.serving import OpenAIServing


class _RetrievalHandler(TaskHandler):
    """POST a validated body to ``OpenAIServing.retrieve``; cancelled when the client hangs up."""

    schema: type[EmbeddingRequest | RerankRequest]

    async def post(self) -> None:
        serving: OpenAIServing = self.application.settings["serving"]
        done, body = await self.run(serving.retrieve(self.parse(self.schema)))
        if done:
            self.write_json(body)


class EmbeddingsHandler(_RetrievalHandler):
    """``POST /v1/embeddings``."""

    schema = EmbeddingRequest


class RerankHandler(_RetrievalHandler):
    """``POST /v1/rerank``."""

    schema = RerankRequest


def routes() -> list[tuple[str, type[web.RequestHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [(r"/v1/embeddings", EmbeddingsHandler), (r"/v1/rerank", RerankHandler)]
