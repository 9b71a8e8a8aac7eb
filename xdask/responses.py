"""OpenAI response bodies of whole (non-streamed) answers (and Xinference's rerank body).

One builder for the HTTP server, the OpenAI Batch API's output lines and
the Python batch futures, so an answer has the same shape wherever it is
read.

Examples
--------
>>> body = chat_completion("m", "Hi!", "stop", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
>>> body["object"], body["choices"][0]["message"]["content"]
('chat.completion', 'Hi!')
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(model: str, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason or "stop",
            "logprobs": None,
        }],
        "usage": usage,
    }


def text_completion(model: str, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
    """A ``text_completion`` object with one choice."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason or "stop", "logprobs": None}],
        "usage": usage,
    }


def embedding_vectors(result: dict[str, Any]) -> np.ndarray:
    """The ``embed`` op's vectors as a ``(count, dimensions)`` float32 array (a view, no copy)."""
    return np.frombuffer(result["embeddings"], dtype="<f4").reshape(result["count"], result["dimensions"])


def embedding_list(model: str, result: dict[str, Any], encoding_format: str = "float") -> dict[str, Any]:
    """OpenAI's embeddings ``list`` from the ``embed`` op's result.

    ``base64`` is each vector's little-endian float32 bytes, base64-encoded,
    as OpenAI sends it (its Python client asks for it by default and decodes
    it itself); ``float`` is JSON numbers.
    """
    vectors = embedding_vectors(result)
    if encoding_format == "base64":
        rows: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        rows = vectors.tolist()
    tokens = int(result.get("prompt_tokens", 0))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def rerank_response(result: dict[str, Any], documents: list[str], top_n: int | None = None,
                    return_documents: bool | None = False) -> dict[str, Any]:
    """Xinference's (Cohere's) rerank body: results sorted by score, best first, cut to ``top_n``.

    Ties keep the documents' order, so equal scores give a stable answer.
    """
    scores = result["scores"]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n is not None:
        order = order[:top_n]
    tokens = int(result.get("input_tokens", 0))
    return {
        "id": str(uuid.uuid4()),
        "results": [{"index": i, "relevance_score": scores[i],
                     "document": {"text": documents[i]} if return_documents else None} for i in order],
        "meta": {"api_version": None, "billed_units": None, "warnings": None,
                 "tokens": {"input_tokens": tokens, "output_tokens": 0}},
    }
