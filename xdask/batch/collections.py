"""Batch inference over dask collections: ``map_chat`` / ``map_generate``, and resumable ``to_parquet``.

``map_chat(series, uid)`` is lazy: each partition becomes one task that
sends its rows to the model (a sliding window of ``chunk_size`` at a time,
``runner.run_chunk_in_thread``) and returns the answers with the partition's
index. A row whose request failed for good (after the lost-replica retries)
gets no answer and, with ``with_errors=True``, its error message; the rest of
the partition completes.

Why partition tasks in worker threads: a dataframe partition is a normal
Dask task, so the collection composes with everything else Dask does
(``read_parquet`` in, ``to_parquet`` out, joins), and the worker's thread
count bounds memory: at most (worker threads x chunk size) rows are at the
model at once.

``to_parquet(ddf, path)`` writes one ``part.<i>.parquet`` per partition,
each atomically (a hidden temporary file, then ``os.replace``), and on a
rerun skips the partitions whose file exists: a run killed halfway resumes
with only the missing partitions in the graph. The path must be one the
workers can write to and the caller can list (a local path on
``xdask-local``, shared storage on a cluster).

Everything here runs on the cluster: compute with a ``distributed.Client``
to xdask's scheduler as Dask's default (``xdask.Client.dask_client()``).

Examples
--------
>>> import dask.dataframe as dd, pandas as pd                  # doctest: +SKIP
>>> from xdask import Client
>>> from xdask.batch import map_chat, to_parquet
>>> Client("http://127.0.0.1:9997").dask_client()      # becomes Dask's default client
>>> questions = dd.from_pandas(pd.DataFrame({"q": ["Hi", "2+2?"]}), npartitions=2)
>>> questions["answer"] = map_chat(questions["q"], "gemma", max_tokens=16, temperature=0)
>>> questions.compute()
>>> to_parquet(map_chat(questions["q"], "gemma", with_errors=True), "/data/answers")   # rerun = resume
{'written': [0, 1], 'skipped': []}
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

from xdask import config
from xdask.batch.futures import (
    BODY_BUILDERS,
    answer_text,
    check_params,
    chunk_size_for,
    ready_concurrency,
)
from xdask.batch.runner import run_chunk_in_thread

#: Columns of ``with_errors=True`` and their pandas dtypes.
ERROR_COLUMNS = {
    "answer": "string",
    "error": "string",
    "finish_reason": "string",
    "prompt_tokens": "Int64",
    "completion_tokens": "Int64",
}


def outcome_row(outcome: dict[str, Any]) -> dict[str, Any]:
    """One outcome as a flat row: ``answer``, ``error``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``."""
    response = outcome.get("response")
    if not response:
        return {"answer": None, "error": outcome["error"]["message"], "finish_reason": None,
                "prompt_tokens": None, "completion_tokens": None}
    used = response.get("usage") or {}
    return {"answer": answer_text(outcome), "error": None,
            "finish_reason": response["choices"][0].get("finish_reason"),
            "prompt_tokens": used.get("prompt_tokens"), "completion_tokens": used.get("completion_tokens")}


async def live_concurrency(client: Any, uid: str) -> int:
    """The model's concurrency from the registry and its actors (as ``GET /v1/models/{uid}`` reports it)."""
    from xdask.cluster.replicas import describe_replica

    record = await client.scheduler.xdask_model(uid=uid)
    if record is None:  # the runner turns every row into a "model not found" outcome
        return 1
    ready = [r for r in record["replicas"] if r["state"] == "ready"]
    infos = await asyncio.gather(*(describe_replica(client, r) for r in ready))
    return ready_concurrency({"state": "ready", "engine": info} for info in infos)


def run_items(uid: str, kind: str, items: list[Any], system: str | None, params: dict[str, Any],
              chunk_size: int | None, retries: int | None) -> list[dict[str, Any]]:
    """In a worker thread: every item's outcome, at most ``chunk_size`` at the model at once."""
    from distributed import get_client, get_worker

    try:
        get_worker()
    except ValueError:
        raise RuntimeError("xdask.batch collections run on xdask's Dask cluster: compute them with a "
                           "distributed.Client to its scheduler (xdask.Client(...).dask_client())") from None
    if not items:
        return []
    size = int(config.get("batch.chunk-size")) if chunk_size is None else int(chunk_size)
    if size <= 0:
        client = get_client()
        size = chunk_size_for(0, client.sync(live_concurrency, client, uid))
    build = BODY_BUILDERS[kind]
    bodies = [build(item, params, system) for item in items]
    return run_chunk_in_thread(uid, kind, bodies, retries, limit=size)


def _answer_partition(part: Any, uid: str, kind: str, system: str | None, params: dict[str, Any],
                      chunk_size: int | None, retries: int | None, with_errors: bool, name: str) -> Any:
    """A pandas Series partition -> its answers (Series), or the ``ERROR_COLUMNS`` frame."""
    import pandas as pd

    outcomes = run_items(uid, kind, part.tolist(), system, params, chunk_size, retries)
    if not with_errors:
        return pd.Series([answer_text(o) for o in outcomes], index=part.index, dtype="string", name=name)
    rows = [outcome_row(o) for o in outcomes]
    return pd.DataFrame({col: pd.array([r[col] for r in rows], dtype=dtype) for col, dtype in ERROR_COLUMNS.items()},
                        index=part.index)


def _answer_bag_partition(items: Any, uid: str, kind: str, system: str | None, params: dict[str, Any],
                          chunk_size: int | None, retries: int | None, with_errors: bool) -> list[Any]:
    outcomes = run_items(uid, kind, list(items), system, params, chunk_size, retries)
    return [outcome_row(o) if with_errors else answer_text(o) for o in outcomes]


def _meta(col: Any, with_errors: bool, name: str) -> Any:
    import pandas as pd

    index = col._meta.index[:0]
    if not with_errors:
        return pd.Series([], index=index, dtype="string", name=name)
    return pd.DataFrame({c: pd.array([], dtype=d) for c, d in ERROR_COLUMNS.items()}, index=index)


def _map(kind: str, col: Any, uid: str, system: str | None, retries: int | None, chunk_size: int | None,
         with_errors: bool, name: str | None, params: dict[str, Any]) -> Any:
    params.pop("stream", None)
    check_params(kind, uid, params)  # a bad shared parameter fails here, not in every row
    import dask.bag as db

    if isinstance(col, db.Bag):
        return col.map_partitions(_answer_bag_partition, uid, kind, system, params, chunk_size, retries,
                                  with_errors)
    try:
        import dask.dataframe as dd
    except ImportError as exc:  # pandas / pyarrow missing
        raise ImportError("map_chat on a dataframe needs the batch extra: pip install 'xdask[batch]'") from exc
    if not isinstance(col, dd.Series):
        raise TypeError(f"map_{'chat' if kind == 'chat' else 'generate'} takes a dask Series (a column of "
                        f"prompts) or a dask Bag, not {type(col).__name__}")
    name = name or "answer"
    return col.map_partitions(_answer_partition, uid, kind, system, params, chunk_size, retries, with_errors, name,
                              meta=_meta(col, with_errors, name), enforce_metadata=False)


def map_chat(col: Any, model_uid: str, *, system: str | None = None, retries: int | None = None,
             chunk_size: int | None = None, with_errors: bool = False, name: str | None = None,
             **params: Any) -> Any:
    """Chat answers for every row of a dask Series of prompts, or every item of a dask Bag (lazy).

    A string is one user message (after ``system``, if given); a Bag item may
    also be a message list or a whole request body. ``params`` (``max_tokens``,
    ``temperature``, ...) apply to every row; invalid ones raise
    ``InvalidRequestError`` at once. Returns, for a Series, a string Series
    named ``name`` (``"answer"``) with None for failed rows, or with
    ``with_errors=True`` a dataframe of ``ERROR_COLUMNS``; for a Bag, answers
    (or row dicts). ``chunk_size``: rows at the model at once per partition
    (default ``batch.chunk-size``, 0 = the model's concurrency).
    """
    return _map("chat", col, model_uid, system, retries, chunk_size, with_errors, name, params)


def map_generate(col: Any, model_uid: str, *, retries: int | None = None, chunk_size: int | None = None,
                 with_errors: bool = False, name: str | None = None, **params: Any) -> Any:
    """Completions (``/v1/completions``) for every prompt of a dask Series or Bag; as ``map_chat``."""
    return _map("completion", col, model_uid, None, retries, chunk_size, with_errors, name, params)


def part_path(path: str | os.PathLike[str], index: int) -> Path:
    """Where ``to_parquet`` writes partition ``index``."""
    return Path(path) / f"part.{index}.parquet"


def _write_part(frame: Any, target: str, options: dict[str, Any]) -> str:
    """Write one partition atomically: readers and reruns see the whole file or none."""
    if not hasattr(frame, "columns"):  # a Series
        frame = frame.to_frame()
    tmp = Path(target).with_name(f".{Path(target).name}.{uuid.uuid4().hex}.tmp")  # hidden: readers skip it
    try:
        frame.to_parquet(tmp, **options)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def to_parquet(ddf: Any, path: str | os.PathLike[str], *, overwrite: bool = False,
               **options: Any) -> dict[str, list[int]]:
    """Compute ``ddf`` into ``path/part.<i>.parquet``, skipping the partitions already written.

    Returns ``{"written": [...], "skipped": [...]}`` (partition numbers). Run
    it again with the same collection and path after a crash: only the
    missing partitions are computed. ``overwrite=True`` removes the old part
    files first. ``options`` go to ``pandas.DataFrame.to_parquet``;
    ``dask.dataframe.read_parquet(path)`` reads the result.
    """
    import dask

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    n = ddf.npartitions
    if overwrite:
        for old in out.glob("part.*.parquet"):
            old.unlink()
    missing = [i for i in range(n) if not part_path(out, i).exists()]
    skipped = sorted(set(range(n)) - set(missing))
    if missing:
        # Only the missing partitions enter the graph: the others are never computed again.
        parts = ddf.partitions[missing].to_delayed()
        token = uuid.uuid4().hex[:8]
        writes = [dask.delayed(_write_part)(part, str(part_path(out, i)), options,
                                            dask_key_name=(f"xdask-write-parquet-{token}", i))
                  for part, i in zip(parts, missing, strict=True)]
        dask.compute(*writes)
    return {"written": missing, "skipped": skipped}
