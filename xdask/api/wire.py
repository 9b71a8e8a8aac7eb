"""The messages a model replica and its callers exchange over one Dask comm (``xdask.cluster.stream``).

Plain dicts with spelled-out keys, so that Dask's msgpack carries them without
pickling on the hot path and a reader of a trace knows what each field is.
A request goes out as a :class:`GenerationRequest` (or an :class:`InvokeRequest`
for embeddings, rerank, images and audio); each answer message is a
:class:`Chunk`: some ``text`` (with the ``finish_reason`` and ``usage`` once
known), an op's ``result``, ``end``, or an ``error`` (``XdaskError.to_wire()``).

Types only: building and reading them is plain dict work on the hot path.

Examples
--------
>>> chunk: Chunk = {"text": "Hello", "finish_reason": "stop",
...                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
>>> chunk["usage"]["completion_tokens"]
1
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class Usage(TypedDict):
    """Token counts of one request so far."""

    prompt_tokens: int
    completion_tokens: int


class GenerationRequest(TypedDict, total=False):
    """A chat or completion request as a replica takes it (validated by the server first)."""

    kind: Literal["chat", "completion"]
    #: False: the replica sends the whole answer in one message at the end.
    stream: bool
    messages: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any]
    prompt: str
    #: ``xdask.engines.SamplingParams`` fields.
    params: dict[str, Any]


class InvokeRequest(TypedDict):
    """A non-generative op (``embed``, ``rerank``, ``text_to_image``, ``transcribe``, ...)."""

    kind: Literal["invoke"]
    op: str
    payload: dict[str, Any]


class Chunk(TypedDict, total=False):
    """One message from the replica: text so far, a result, the end, or an error."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    #: A non-generative op's result.
    result: dict[str, Any]
    #: The last message of the request.
    end: bool
    #: ``XdaskError.to_wire()`` of what went wrong.
    error: dict[str, Any]
