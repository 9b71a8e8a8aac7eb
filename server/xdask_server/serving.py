"""Requests at this server: admission, statistics, and the cluster's serving functions.

No Tornado here (the HTTP bindings are ``chat``, ``retrieval``, ``images``,
``audio``). What a request does on the cluster is ``xdask.cluster.serving``
(shared with the batch runner); this module adds what only a server has: the
model's ``request_limits`` (429) and the per-model statistics of the
dashboard and ``/metrics`` (every request is counted once it ends: ok, error
or cancelled).

Examples
--------
>>> serving = OpenAIServing(supervisor)                                     # doctest: +SKIP
>>> record = await supervisor.record("gemma")
>>> body = await serving.complete(CompletionRequest(model="gemma", prompt="1, 2, 3,", max_tokens=4), record)
>>> body["choices"][0]["text"]
' 4, 5'
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from xdask.api.chat import ChatCompletionRequest, CompletionRequest
from xdask.api.embeddings import EmbeddingRequest, RerankRequest
from xdask.cluster import serving
from xdask_server.stats import RequestStats

if TYPE_CHECKING:
    from xdask.cluster.supervisor import Supervisor


class OpenAIServing:
    """Requests against the models of a ``Supervisor``, counted in ``stats``."""

    def __init__(self, supervisor: Supervisor, stats: RequestStats | None = None):
        self.supervisor = supervisor
        self.stats = stats if stats is not None else RequestStats()

    async def complete(self, req: ChatCompletionRequest | CompletionRequest,
                       record: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole response body of a chat or completion request (``record``: the model's, if looked up)."""
        record = record if record is not None else await self.supervisor.record(req.model)
        with self.stats.admit(req.model, record, streamed=False) as tracker:
            return await serving.answer(self.supervisor.router, record, req, tracker.message)

    async def stream(self, req: ChatCompletionRequest | CompletionRequest,
                     record: dict[str, Any] | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """The SSE chunks of a streamed request (without ``[DONE]``).

        Closing the iterator early (the client hung up) counts the request as
        cancelled and cancels the generation.
        """
        record = record if record is not None else await self.supervisor.record(req.model)
        with self.stats.admit(req.model, record, streamed=True) as tracker:
            async for chunk in serving.chat_chunks(self.supervisor.router, record, req, tracker.message):
                yield chunk

    async def retrieve(self, req: EmbeddingRequest | RerankRequest) -> dict[str, Any]:
        """The body of ``POST /v1/embeddings`` or ``POST /v1/rerank``."""
        record = await self.supervisor.record(req.model)
        with self.stats.admit(req.model, record, streamed=False) as tracker:
            if isinstance(req, EmbeddingRequest):
                body, tokens = await serving.embed(self.supervisor.router, record, req)
            else:
                body, tokens = await serving.rerank(self.supervisor.router, record, req)
            tracker.message({"usage": {"prompt_tokens": tokens, "completion_tokens": 0}})
        return body

    async def invoke(self, uid: str, model_type: str, endpoint: str, op: str, payload: dict[str, Any]
                     ) -> dict[str, Any]:
        """The result of op ``op`` on a ``model_type`` model (images, audio): 400 for a model of another type."""
        record = await self.supervisor.record(uid)
        with self.stats.admit(uid, record, streamed=False):
            serving.check_model_type(record, model_type, endpoint)
            return await serving.invoke(self.supervisor.router, record, op, payload)
