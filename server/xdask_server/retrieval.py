"""Engine-agnostic logic of ``/v1/embeddings`` and ``/v1/rerank``: validated request in, response body out.

No Tornado here (the HTTP binding is ``xdask_server.embeddings``): each call
checks that the model is of the right type (400 ``wrong_model_type``),
sends one ``invoke`` to a replica (``Supervisor.invoke``: least-loaded
replica, retried on a lost one, bounded by ``xdask.server.request-timeout``)
and builds the body with the same builders the batch runner uses
(``xdask.responses``). Input limits are the schemas' (``xdask.protocol``);
the model checks what only it knows (its length limit, its vector size).

Examples
--------
>>> serving = RetrievalServing(supervisor)                                 # doctest: +SKIP
>>> body = await serving.embed(EmbeddingRequest.model_validate({"model": "all-MiniLM-L6-v2", "input": "hi"}))
>>> len(body["data"][0]["embedding"])
384
"""

from __future__ import annotations

from typing import Any

from xdask.cluster.supervisor import Supervisor
from xdask.protocol import EmbeddingRequest, RerankRequest
from xdask.responses import embedding_list, rerank_response
from xdask_server.limits import admit
from xdask_server.serving import check_model_type
from xdask_server.stats import RequestStats


class RetrievalServing:
    """Embedding and rerank requests against the models of a ``Supervisor``, counted in ``stats``."""

    def __init__(self, supervisor: Supervisor, stats: RequestStats | None = None):
        self.supervisor = supervisor
        self.stats = stats if stats is not None else RequestStats()

    async def _invoke(self, uid: str, model_type: str, endpoint: str, op: str, payload: dict[str, Any],
                      tokens_key: str) -> dict[str, Any]:
        await admit(self.supervisor, self.stats, uid)
        with self.stats.track(uid, streamed=False) as tracker:
            record = await self.supervisor._record(uid)
            check_model_type(record, model_type, endpoint)
            result = await self.supervisor.invoke(uid, op, payload)
            tracker.message({"u": [int(result.get(tokens_key, 0)), 0]})
        return result

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
        """The ``list`` body of ``POST /v1/embeddings``."""
        result = await self._invoke(req.model, "embedding", "/v1/embeddings", "embed", req.payload(),
                                    "prompt_tokens")
        return embedding_list(req.model, result, req.encoding_format)

    async def rerank(self, req: RerankRequest) -> dict[str, Any]:
        """The body of ``POST /v1/rerank``: results sorted by relevance, best first."""
        result = await self._invoke(req.model, "rerank", "/v1/rerank", "rerank", req.payload(), "input_tokens")
        return rerank_response(result, req.documents, req.top_n, req.return_documents)
