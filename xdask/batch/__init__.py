"""Batch inference on the cluster: futures, dask collections and the OpenAI Batch API share ``runner``.

Examples
--------
>>> from xdask.batch import map_chat, to_parquet                # doctest: +SKIP
>>> answers = map_chat(ddf["question"], "gemma", max_tokens=32)   # lazy, a dask Series
>>> to_parquet(answers.to_frame(), "/data/answers")              # resumable
"""

from xdask.batch.collections import map_chat, map_generate, to_parquet
from xdask.batch.futures import BatchFutures

__all__ = ["BatchFutures", "map_chat", "map_generate", "to_parquet"]
