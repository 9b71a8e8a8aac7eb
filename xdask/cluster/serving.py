"""A validated OpenAI request served by a model on the cluster: the functions HTTP and the batch runner share.

No HTTP here. The server (``xdask_server``) adds admission and statistics
around these functions and writes what they return; the batch runner
(``xdask.batch.runner``) calls the same ones from a Dask task on a worker,
so a batch item and an HTTP request are answered by the same code.

Each function takes the model's registry record, looked up once by the
caller, and a ``router``: anything with ``stream(uid, request, record=...)``
that yields the replica's ``xdask.api.wire`` chunks (``routing.Router``:
least outstanding requests, a lost replica retried on another). Every call
is bounded by ``xdask.server.request-timeout`` (504).

Examples
--------
>>> record = await supervisor.record("gemma")                                   # doctest: +SKIP
>>> req = ChatCompletionRequest.model_validate({"model": "gemma", "messages": [{"role": "user", "content": "Hi"}]})
>>> body = await answer(supervisor.router, record, req)
>>> body["choices"][0]["message"]["content"]
'Hello! How can I help?'
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from xdask import config
from xdask.api.chat import (
    ChatCompletionRequest,
    ChunkBuilder,
    CompletionRequest,
    afold_stream,
    internal_request,
    request_kind,
    resolve_max_tokens,
)
from xdask.api.embeddings import EmbeddingRequest, RerankRequest, embedding_list, rerank_response
from xdask.api.wire import Chunk, GenerationRequest, InvokeRequest
from xdask.errors import InvalidRequestError, RequestTimeoutError, XdaskError

#: What each generation request kind is called in a ``wrong_model_type`` message.
ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}

#: Called with every wire chunk of a request (the server's statistics count tokens with it).
Observer = Callable[[Chunk], None]


class ReplicaStream(Protocol):
    """What the serving functions need of a router: one request's chunks from a replica of ``uid``."""

    def stream(self, uid: str, request: GenerationRequest | InvokeRequest,
               record: dict[str, Any] | None = None) -> AsyncIterator[Chunk]: ...


def check_model_type(record: dict[str, Any], model_type: str, endpoint: str) -> None:
    """400 ``wrong_model_type`` when ``endpoint`` is called on a model of another type."""
    actual = record["spec"].get("model_type") or "LLM"
    if actual != model_type:
        raise InvalidRequestError(
            f"Model {record['model_uid']} is a{'n' if actual[0] in 'aeiouAEIOU' else ''} {actual} model; "
            f"{endpoint} serves {model_type} models",
            param="model", code="wrong_model_type",
        )


async def _bounded(router: ReplicaStream, uid: str, request: GenerationRequest | InvokeRequest,
                   record: dict[str, Any]) -> AsyncIterator[Chunk]:
    """The replica's chunks, within ``xdask.server.request-timeout`` (504 after it)."""
    deadline = float(config.get("server.request-timeout"))
    try:
        async with asyncio.timeout(deadline):
            async for chunk in router.stream(uid, request, record=record):
                yield chunk
    except TimeoutError as exc:
        raise RequestTimeoutError(f"The model took longer than {deadline} s") from exc


async def chat_chunks(router: ReplicaStream, record: dict[str, Any], req: ChatCompletionRequest | CompletionRequest,
                      observe: Observer | None = None, include_usage: bool | None = None,
                      ) -> AsyncIterator[dict[str, Any]]:
    """The OpenAI stream chunks of a chat or completion request (without SSE's ``[DONE]``).

    The record checks (model type, ``max_tokens`` against the context) run
    before the first chunk, so their errors come before any byte is sent.
    ``include_usage`` (default: the request's ``stream_options``) adds the
    closing usage chunk.
    """
    kind = request_kind(req)
    check_model_type(record, "LLM", ENDPOINTS[kind])
    internal = internal_request(req, resolve_max_tokens(req.requested_max_tokens,
                                                        int(record["spec"]["context_length"])))
    builder = ChunkBuilder(kind, req.model, req.include_usage if include_usage is None else include_usage)
    prompt_tokens = completion_tokens = 0
    finish: str | None = None
    first = builder.first()
    if first is not None:
        yield first
    async for chunk in _bounded(router, req.model, internal, record):
        if observe is not None:
            observe(chunk)
        usage = chunk.get("usage")
        if usage:
            prompt_tokens, completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        finish = chunk.get("finish_reason") or finish
        if chunk.get("text"):
            yield builder.text(chunk["text"])
    yield builder.last(finish)
    if builder.include_usage:
        yield builder.usage_chunk(prompt_tokens, completion_tokens)


async def answer(router: ReplicaStream, record: dict[str, Any], req: ChatCompletionRequest | CompletionRequest,
                 observe: Observer | None = None) -> dict[str, Any]:
    """The whole answer (``chat.completion`` / ``text_completion``): the fold of its chunks.

    The replica is asked for a non-streamed answer (``req.stream`` false):
    it sends everything in one message at the end.
    """
    if req.stream:
        req = req.model_copy(update={"stream": False})
    return await afold_stream(chat_chunks(router, record, req, observe, include_usage=True))


async def invoke(router: ReplicaStream, record: dict[str, Any], op: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The result of a non-generative op (``embed``, ``rerank``, ``text_to_image``, ``transcribe``, ...)."""
    request: InvokeRequest = {"kind": "invoke", "op": op, "payload": payload}
    async for chunk in _bounded(router, record["model_uid"], request, record):
        if "result" in chunk:
            return chunk["result"]
    raise XdaskError(f"Model {record['model_uid']} ended {op} without a result")


async def embed(router: ReplicaStream, record: dict[str, Any], req: EmbeddingRequest) -> tuple[dict[str, Any], int]:
    """OpenAI's embeddings ``list`` and the prompt tokens it took."""
    check_model_type(record, "embedding", "/v1/embeddings")
    result = await invoke(router, record, "embed", req.payload())
    return embedding_list(req.model, result, req.encoding_format), int(result.get("prompt_tokens", 0))


async def rerank(router: ReplicaStream, record: dict[str, Any], req: RerankRequest) -> tuple[dict[str, Any], int]:
    """The rerank body (results sorted by relevance, best first) and the input tokens it took."""
    check_model_type(record, "rerank", "/v1/rerank")
    result = await invoke(router, record, "rerank", req.payload())
    return (rerank_response(result, req.documents, req.top_n, req.return_documents),
            int(result.get("input_tokens", 0)))
