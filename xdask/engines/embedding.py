"""Embedding engine: a sentence-transformers ``SentenceTransformer`` behind the ``embed`` op.

Concurrent ``embed`` calls on a replica are batched into one ``encode``
(``xdask.engines.batching``), which is where the throughput comes from on a
CPU or a GPU. The result carries the vectors as little-endian float32 bytes
(what OpenAI's base64 encoding is, and half the size of msgpack floats
between worker and server) plus the real token counts for ``usage``.

Decisions:

* ``dimensions``: the model's full size is always allowed. A smaller size is
  served only for families marked ``matryoshka`` (trained so that a prefix of
  the vector is itself an embedding): the vector is cut and, when the model
  normalizes its output, normalized again, as OpenAI does for its
  ``text-embedding-3`` models. Elsewhere a cut vector is noise, so it is a
  400 that says which sizes exist. all-MiniLM-L6-v2 has only its 384.
* Inputs longer than the model reads (``max_seq_length``, special tokens
  included) are a 400 ``context_length_exceeded``, as OpenAI answers, rather
  than the silent truncation sentence-transformers would do; set
  ``xdask.embedding.truncate: true`` to truncate instead.
* ``usage.prompt_tokens`` counts the tokens the model reads, special tokens
  included (what the batch costs), as Xinference reports them.

Examples
--------
>>> from xdask.registry import resolve                                      # doctest: +SKIP
>>> engine = make_engine(resolve("all-MiniLM-L6-v2", model_type="embedding"), "/models/minilm", {})
>>> engine.load()
>>> out = engine.invoke("embed", {"input": ["hello", "world"]})
>>> out["count"], out["dimensions"], out["prompt_tokens"]
(2, 384, 6)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xdask import config
from xdask.engines.st_common import (
    SentenceTransformersEngine,
    SentenceTransformersOptions,
    make_options,
)
from xdask.errors import InvalidRequestError
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)


class SentenceTransformerEmbedding(SentenceTransformersEngine):
    """A ``SentenceTransformer`` model serving ``embed``: ``{"input": [str], "dimensions"?}``.

    Returns ``{"embeddings": bytes, "count", "dimensions", "prompt_tokens"}``:
    ``count`` rows of ``dimensions`` little-endian float32 values, row-major
    (``xdask.api.embeddings.embedding_vectors`` reads them back).
    """

    ops = frozenset({"embed"})
    kind = "embedding model"

    def __init__(self, resolved: ResolvedModel, model_path: str, options: SentenceTransformersOptions,
                 gpu_idx: list[int] | None):
        super().__init__(resolved, model_path, options, gpu_idx)
        self.dimensions = int(getattr(self.family, "dimensions", 0))
        self.max_seq_length = int(getattr(self.family, "max_tokens", 0))
        self.normalized = False
        self.matryoshka = bool(getattr(self.family, "matryoshka", False))
        self.truncate = bool(config.get("embedding.truncate"))

    def _build(self) -> Any:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(self.model_path, device=self.settings["device"], local_files_only=True,
                                    trust_remote_code=self.options.trust_remote_code)
        size = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
        if size and size != self.dimensions:
            logger.warning("%s: the family says %s dimensions, the model makes %s: serving the model's",
                           self.family.model_name, self.dimensions, size)
            self.dimensions = int(size)
        # What encode truncates to; the family's number when the model leaves it open.
        self.max_seq_length = int(model.max_seq_length or self.max_seq_length)
        self.normalized = any(type(module).__name__ == "Normalize" for module in model)
        return model

    def _run(self, texts: list[str]) -> np.ndarray:
        """One ``encode`` over every queued text (the batching thread)."""
        return self.model.encode(texts, batch_size=self.settings["encode_batch_size"], convert_to_numpy=True,
                                 show_progress_bar=False)

    def invoke(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Embed ``payload["input"]``; bad input (too long, wrong ``dimensions``) raises a 400."""
        if op not in self.ops:
            raise InvalidRequestError(f"The embedding engine serves {sorted(self.ops)}, not {op!r}", param="op")
        batcher = self._require_loaded()
        texts = payload.get("input")  # a tuple once it crossed a Dask comm (msgpack without lists)
        if not isinstance(texts, list | tuple) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise InvalidRequestError("input must be a non-empty list of non-empty strings", param="input")
        texts = list(texts)
        size = self.output_dimensions(payload.get("dimensions"))
        counts = self.count_tokens(texts)
        self.check_lengths(counts)
        rows = batcher.submit(texts)
        vectors = np.asarray(np.stack(rows), dtype="<f4")
        if size < vectors.shape[1]:
            vectors = vectors[:, :size]
            if self.normalized:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, 1e-12)
        return {"embeddings": np.ascontiguousarray(vectors, dtype="<f4").tobytes(), "count": len(texts),
                "dimensions": size, "prompt_tokens": sum(min(n, self.max_seq_length) for n in counts)}

    def output_dimensions(self, requested: Any) -> int:
        """The vector size a request gets: the model's, or a smaller one for a Matryoshka model; else 400."""
        full = self.dimensions
        if requested is None or requested == full:
            return full
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise InvalidRequestError(f"dimensions must be a positive integer, not {requested!r}", param="dimensions")
        if requested > full:
            raise InvalidRequestError(
                f"dimensions={requested} is more than {self.family.model_name} makes ({full})", param="dimensions")
        if not self.matryoshka:
            raise InvalidRequestError(
                f"{self.family.model_name} makes {full}-dimensional vectors and was not trained to be cut "
                f"shorter (Matryoshka); omit dimensions or ask for {full}", param="dimensions")
        return requested

    def check_lengths(self, counts: list[int]) -> None:
        """400 ``context_length_exceeded`` for an input longer than the model reads (unless truncating)."""
        if self.truncate:
            return
        for i, n in enumerate(counts):
            if n > self.max_seq_length:
                raise InvalidRequestError(
                    f"input[{i}] is {n} tokens long; {self.family.model_name} reads at most "
                    f"{self.max_seq_length} (special tokens included). Shorten or split it "
                    "(or set xdask.embedding.truncate to cut long inputs)",
                    param="input", code="context_length_exceeded")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dimensions": self.dimensions, "max_seq_length": self.max_seq_length,
                "normalized": self.normalized, "matryoshka": self.matryoshka, "truncate": self.truncate}


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> SentenceTransformerEmbedding:
    """Build (not load) the engine; unknown options or a device that contradicts ``gpu_idx`` are a 400."""
    options, gpu_idx = make_options(kwargs, gpu_idx)
    return SentenceTransformerEmbedding(resolved, model_path, options, gpu_idx)
