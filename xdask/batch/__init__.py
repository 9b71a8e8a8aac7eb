"""Batch inference on the cluster: futures, dask collections and the OpenAI Batch API share ``runner``.

Examples
--------
>>> batch = model.chat_batch(["Hi", "2+2?"], max_tokens=16)      # doctest: +SKIP
>>> batch.answers()
"""

from xdask.batch.futures import BatchFutures

__all__ = ["BatchFutures"]
