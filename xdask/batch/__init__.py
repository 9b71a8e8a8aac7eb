"""Batch inference on the cluster: futures, dask collections and the OpenAI Batch API share ``runner``."""
