"""Rerank engine: a sentence-transformers ``CrossEncoder`` behind the ``rerank`` op.

A cross-encoder reads the query and one document together and gives one
relevance score per pair. Every (query, document) pair of concurrent
requests goes through one ``predict`` call (``xdask.engines.batching``), so
many small rerank requests cost about what one large one does.

Decisions:

* Scores are what ``CrossEncoder.predict`` returns, with the model's own
  activation (a sigmoid for one-label models unless the model says
  otherwise): 0..1 relevance, as Cohere's API gives.
* Documents longer than the model reads are truncated (longest side of the
  pair first), as Cohere and Xinference do; rerank inputs are retrieved
  chunks whose length the caller rarely controls, so a 400 would make long
  documents unrankable. ``meta.tokens.input_tokens`` counts the pair tokens
  the model actually read.
* Only ``type: normal`` families (cross-encoders) load here; LLM-based
  rerankers need another engine and fail at launch with a 400 that says so.

Examples
--------
>>> engine = make_engine(resolved, "/models/reranker", {})                  # doctest: +SKIP
>>> engine.load()
>>> engine.invoke("rerank", {"query": "capital of France", "documents": ["Paris is...", "Bananas..."]})
{'scores': [0.98, 0.01], 'input_tokens': 21}
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xdask.engines.st_common import (
    SentenceTransformersEngine,
    SentenceTransformersOptions,
    make_options,
)
from xdask.errors import EngineUnavailableError, InvalidRequestError, ModelLoadError
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)


class CrossEncoderRerank(SentenceTransformersEngine):
    """A ``CrossEncoder`` serving ``rerank``: ``{"query": str, "documents": [str]}``.

    Returns ``{"scores": [float, ...], "input_tokens": int}``, one score per
    document in the order given; sorting and ``top_n`` are the API's job
    (``xdask.api.embeddings.rerank_response``).
    """

    ops = frozenset({"rerank"})
    kind = "reranker"

    def __init__(self, resolved: ResolvedModel, model_path: str, options: SentenceTransformersOptions,
                 gpu_idx: list[int] | None):
        super().__init__(resolved, model_path, options, gpu_idx)
        self.max_length = int(getattr(self.family, "max_tokens", 512))

    def _build(self) -> Any:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(self.model_path, device=self.settings["device"], local_files_only=True,
                             trust_remote_code=self.options.trust_remote_code)
        if model.num_labels != 1:
            raise ModelLoadError(f"{self.family.model_name} has {model.num_labels} output labels; a reranker "
                                 "gives one relevance score per pair (num_labels=1)")
        own = model.max_seq_length or getattr(model.tokenizer, "model_max_length", None)
        if own and own < 10**6:  # tokenizers without a limit report a huge sentinel
            self.max_length = min(int(own), self.max_length) if self.max_length else int(own)
        model.max_seq_length = self.max_length  # predict truncates here; token counts use the same number
        return model

    def _run(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """One ``predict`` over every queued pair (the batching thread)."""
        scores = self.model.predict(pairs, batch_size=self.settings["encode_batch_size"], convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(scores, dtype=np.float64).reshape(len(pairs))

    def invoke(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Score every document against the query; malformed payloads raise a 400."""
        if op not in self.ops:
            raise InvalidRequestError(f"The rerank engine serves {sorted(self.ops)}, not {op!r}", param="op")
        batcher = self._require_loaded()
        query, documents = payload.get("query"), payload.get("documents")
        if not isinstance(query, str) or not query:
            raise InvalidRequestError("query must be a non-empty string", param="query")
        if not isinstance(documents, list | tuple) or not documents or not all(isinstance(d, str) for d in documents):
            raise InvalidRequestError("documents must be a non-empty list of strings", param="documents")
        documents = list(documents)  # a tuple once it crossed a Dask comm
        counts = self.count_tokens([query] * len(documents), documents, max_length=self.max_length)
        scores = batcher.submit([(query, doc) for doc in documents])
        return {"scores": [float(s) for s in scores], "input_tokens": sum(counts)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_length": self.max_length}


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> CrossEncoderRerank:
    """Build (not load) the engine; LLM-based rerankers and bad options are a 400."""
    kind = getattr(resolved.family, "type", "normal")
    if kind != "normal":
        raise EngineUnavailableError(
            f"{resolved.family.model_name} is an {kind} reranker; the sentence_transformers engine runs "
            "cross-encoders (type normal) only", param="model_name")
    options, gpu_idx = make_options(kwargs, gpu_idx)
    return CrossEncoderRerank(resolved, model_path, options, gpu_idx)
