"""Embedding and rerank requests (OpenAI's and Xinference's/Cohere's shapes) and their answers.

The server, the Batch API and the Python batch helpers validate with these
schemas and build the same bodies from an engine's result, so an answer has
the same shape wherever it is read.

Examples
--------
>>> EmbeddingRequest.model_validate({"model": "m", "input": "hello"}).input
['hello']
>>> body = rerank_response({"scores": [0.1, 0.9], "input_tokens": 7}, ["a", "b"], top_n=1)
>>> [(r["index"], r["relevance_score"]) for r in body["results"]]
[(1, 0.9)]
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from xdask.api.base import MAX_MODEL_NAME, STRICT, invalid


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` in OpenAI's shape; ``input`` comes out as a list of strings.

    OpenAI also takes token ids (a list of integers, or of such lists); xdask
    embeds text only, and says so. Empty strings are refused as OpenAI does;
    ``xdask.embedding.max-inputs`` caps the list.
    """

    model_config = STRICT
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    input: list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> list[str]:
        from xdask import config

        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise invalid("must be a string or a list of strings")
        if not texts:
            raise invalid("must not be an empty list")
        limit = int(config.get("embedding.max-inputs"))
        if len(texts) > limit:
            raise invalid(f"holds {len(texts)} items; at most {limit} per request")
        for i, text in enumerate(texts):
            if isinstance(text, str):
                if not text:
                    raise invalid(f"item {i} is an empty string (there is nothing to embed)")
                continue
            if isinstance(text, int | list) and not isinstance(text, bool):
                raise invalid("token-id input (integers, or lists of integers) is not supported: send text")
            raise invalid(f"item {i} must be a string, not {type(text).__name__}")
        return texts

    def payload(self) -> dict[str, Any]:
        """The ``embed`` op's payload (``xdask.engines.embedding``)."""
        return {"input": self.input, "dimensions": self.dimensions}


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` in Xinference's (Cohere's) shape.

    ``documents`` are strings or ``{"text": ...}`` objects; ``top_n`` above
    the number of documents returns them all; ``max_chunks_per_doc`` and
    ``return_len`` are accepted and ignored (long documents are truncated,
    and token counts are always reported).
    """

    model_config = STRICT
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    query: str = Field(min_length=1)
    documents: list[str]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool | None = None
    return_len: bool | None = None
    max_chunks_per_doc: int | None = Field(default=None, ge=1)

    @field_validator("documents", mode="before")
    @classmethod
    def _check_documents(cls, value: Any) -> list[str]:
        from xdask import config

        if not isinstance(value, list):
            raise invalid("must be a list of strings or of {\"text\": ...} objects")
        if not value:
            raise invalid("must not be empty")
        limit = int(config.get("rerank.max-documents"))
        if len(value) > limit:
            raise invalid(f"holds {len(value)} items; at most {limit} per request")
        texts = []
        for i, doc in enumerate(value):
            if isinstance(doc, dict) and isinstance(doc.get("text"), str):
                doc = doc["text"]
            if not isinstance(doc, str):
                raise invalid(f"item {i} must be a string or an object with a string \"text\"")
            texts.append(doc)
        return texts

    def payload(self) -> dict[str, Any]:
        """The ``rerank`` op's payload (``xdask.engines.rerank``)."""
        return {"query": self.query, "documents": self.documents}


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
