"""Batch inference as Dask futures: ``ModelHandle.chat_batch`` / ``generate_batch`` / ``embed_batch``.

A list of prompts becomes chunks of OpenAI bodies; each chunk is one Dask
task of ``runner.run_chunk`` (the items of a chunk go to the model at once,
so the engine batches them). The caller gets a ``BatchFutures``: a plain
list of the chunk futures, so Dask's own tools work on it unchanged
(``distributed.as_completed``, ``wait``, ``progress``, ``client.gather``),
plus helpers that speak in items rather than chunks.

Why bad items do not raise: in a batch of thousands, one malformed item
should cost one error row, not the batch; a bad *parameter* shared by every
item (``temperature=5``) raises ``InvalidRequestError`` at once instead,
before anything is submitted.

Memory: a chunk task is an ``async def`` task, and it holds one of its
worker's threads while it runs, so at most (worker threads x chunk size)
items are in flight across the cluster, whatever the batch's length. The
bodies themselves travel with the tasks (client -> scheduler -> worker) and
each finished chunk's outcomes stay on its worker until gathered or
released; for inputs that do not fit in the client's memory, use a dask
collection (``xdask.batch.map_chat``) read lazily from storage.

Examples
--------
>>> from xdask import Client                                   # doctest: +SKIP
>>> model = Client("http://127.0.0.1:9997").get_model("gemma")
>>> batch = model.chat_batch(["Hi", "What is 2+2?"], max_tokens=16, temperature=0)
>>> batch.answers()
['Hello! How can I help?', '2 + 2 = 4']
>>> for index, outcome in batch.as_completed():
...     print(index, outcome["error"] or outcome["response"]["usage"])
>>> import distributed
>>> distributed.progress(batch)        # Dask's progress bar over the chunk tasks
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from xdask import config
from xdask.batch.runner import parse_item, run_chunk

if TYPE_CHECKING:
    from distributed import Client as DaskClient
    from distributed import Future


def ready_concurrency(replicas: Iterable[dict[str, Any]]) -> int:
    """Requests the model serves at once: ``max_concurrency`` summed over its ready replicas (at least 1).

    ``replicas`` are the entries of ``GET /v1/models/{uid}`` (each with the
    actor's ``engine`` facts).
    """
    total = sum(int((r.get("engine") or {}).get("max_concurrency") or 0)
                for r in replicas if r.get("state") == "ready")
    return max(total, 1)


def chunk_size_for(chunk_size: int | None, concurrency: int) -> int:
    """The chunk size to use: the caller's, else ``batch.chunk-size``, else (0) the model's concurrency."""
    size = int(config.get("batch.chunk-size")) if chunk_size is None else int(chunk_size)
    return size if size > 0 else max(int(concurrency), 1)


def chat_body(item: Any, params: dict[str, Any], system: str | None = None) -> Any:
    """The chat body of one item: a string is one user message, a list is the messages.

    A dict is taken as a whole body (``params`` fill what it lacks); anything
    else is passed on as the messages, so that the runner turns it into that
    item's error outcome.
    """
    if isinstance(item, dict):
        return {**params, **item}
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
    if system is not None and isinstance(messages, list):
        messages = [{"role": "system", "content": system}, *messages]
    return {**params, "messages": messages}


def completion_body(item: Any, params: dict[str, Any], system: str | None = None) -> Any:
    """The completion body of one prompt (a dict is a whole body; ``system`` does not apply)."""
    if isinstance(item, dict):
        return {**params, **item}
    return {**params, "prompt": item}


def embedding_body(item: Any, params: dict[str, Any], system: str | None = None) -> Any:
    """The embeddings body of one text (a dict is a whole body; ``system`` does not apply)."""
    if isinstance(item, dict):
        return {**params, **item}
    return {**params, "input": item}


BODY_BUILDERS = {"chat": chat_body, "completion": completion_body, "embedding": embedding_body}


def check_params(kind: str, uid: str, params: dict[str, Any]) -> None:
    """Raise ``InvalidRequestError`` now if the shared parameters are invalid for every item."""
    probe = BODY_BUILDERS[kind]("x", params)
    parse_item(kind, uid, probe)


def answer_vector(outcome: dict[str, Any]) -> list[float] | str | None:
    """The (first) vector of an embeddings outcome, None for an error."""
    response = outcome.get("response")
    if not response:
        return None
    return response["data"][0]["embedding"]


def answer_text(outcome: dict[str, Any]) -> str | None:
    """The generated text of an outcome (chat or completion), None for an error."""
    response = outcome.get("response")
    if not response:
        return None
    choice = response["choices"][0]
    if "message" in choice:
        return choice["message"].get("content")
    return choice.get("text")


class BatchFutures(list):  # list[Future]
    """The chunk futures of one batch, in input order, with item-level helpers.

    It is a list of ``distributed.Future`` (one per chunk), and Dask's tools
    take it as it is: ``distributed.wait(batch)``,
    ``distributed.as_completed(batch)``, ``distributed.progress(batch)``.
    ``client.gather`` only looks inside a plain ``list``: give it
    ``batch.futures`` (or call ``batch.results()``, which also flattens).

    Examples
    --------
    >>> batch = model.generate_batch(["1, 2, 3,", "a, b, c,"], max_tokens=4)   # doctest: +SKIP
    >>> batch.progress()
    {'items': 2, 'done': 0, 'chunks': 1, 'chunks_done': 0, 'chunks_failed': 0}
    >>> [o["response"]["usage"]["completion_tokens"] for o in batch.results()]
    [4, 4]
    """

    def __init__(self, futures: Sequence[Future], sizes: Sequence[int], client: DaskClient, uid: str, kind: str):
        super().__init__(futures)
        self.sizes = list(sizes)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.client = client
        self.uid = uid
        self.kind = kind

    def __repr__(self) -> str:
        p = self.progress()
        return f"<BatchFutures {self.kind} {self.uid}: {p['done']}/{p['items']} items, {p['chunks']} chunks>"

    def __dask_graph__(self) -> dict[Any, Future]:
        # What ``distributed.futures_of`` reads, so ``wait`` and ``progress`` find the futures in this
        # list subclass (they look inside exact ``list``s only).
        return {f.key: f for f in self}

    @property
    def futures(self) -> list[Future]:
        """The chunk futures as a plain list (for ``client.gather``)."""
        return list(self)

    def results(self) -> list[dict[str, Any]]:
        """Every item's outcome, in input order (waits for all chunks)."""
        return [outcome for chunk in self.client.gather(self.futures) for outcome in chunk]

    def answers(self) -> list[Any]:
        """Every item's answer, in input order; None where the item failed.

        The generated text of a chat or completion batch; for an embedding
        batch, each item's vector (its first one, for a body with several
        inputs: read ``results()`` for all of them).
        """
        pick = answer_vector if self.kind == "embedding" else answer_text
        return [pick(o) for o in self.results()]

    def as_completed(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(input index, outcome)`` for each item, a chunk at a time as chunks finish."""
        from distributed import as_completed

        where = {f.key: i for i, f in enumerate(self)}
        for future, outcomes in as_completed(self.futures, with_results=True):
            start = self.offsets[where[future.key]]
            for j, outcome in enumerate(outcomes):
                yield start + j, outcome

    def progress(self) -> dict[str, int]:
        """Counts now: ``items``, ``done`` (items of finished chunks), ``chunks``, ``chunks_done``,
        ``chunks_failed``."""
        finished = [f.status == "finished" for f in self]
        return {
            "items": sum(self.sizes),
            "done": sum(n for n, ok in zip(self.sizes, finished, strict=True) if ok),
            "chunks": len(self),
            "chunks_done": sum(finished),
            "chunks_failed": sum(f.status == "error" for f in self),
        }

    def cancel(self) -> None:
        """Cancel the chunks not finished yet (items already at the model still complete there)."""
        self.client.cancel(self.futures)


def submit_batch(
    client: DaskClient,
    uid: str,
    kind: str,
    items: Sequence[Any],
    *,
    concurrency: int,
    chunk_size: int | None = None,
    retries: int | None = None,
    system: str | None = None,
    **params: Any,
) -> BatchFutures:
    """Submit ``items`` to model ``uid`` as ``run_chunk`` tasks; ``concurrency`` is the model's (for the chunk size).

    Raises ``InvalidRequestError`` for invalid shared ``params``; an invalid
    item becomes its own error outcome.
    """
    params.pop("stream", None)  # a batch item's answer is whole
    check_params(kind, uid, params)
    build = BODY_BUILDERS[kind]
    bodies = [build(item, params, system) for item in items]
    size = chunk_size_for(chunk_size, concurrency)
    # One key prefix per batch: Dask's progress bars and dashboard group tasks by it.
    prefix = f"xdask-{kind}-{uid}-{uuid.uuid4().hex[:8]}"
    futures = []
    sizes = []
    for n, start in enumerate(range(0, len(bodies), size)):
        chunk = bodies[start:start + size]
        futures.append(client.submit(run_chunk, uid, kind, chunk, retries, key=(prefix, n), pure=False))
        sizes.append(len(chunk))
    return BatchFutures(futures, sizes, client, uid, kind)
