"""The llama.cpp libraries called directly in-process: the baseline ("a") side of the llama.cpp benchmarks.

Why a module of its own: bench_llm.py, bench_batch.py and
bench_llama_cpp_batching.py compare xdask against the same baselines, and a
comparison is only fair if the baseline is built the same way everywhere
(same GGUF, slot count, context and threads as xdask's engine).

* xllamacpp: ``Server.handle_completions`` with xdask's slot count; it is
  thread-safe, one thread per request.
* llama-cpp-python: ``Llama.create_completion`` behind a lock (it is not
  thread-safe), i.e. one request at a time.

Both count tokens from the library's own ``usage``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from harness import Complete, Reply, cores

#: Backend name (xdask's ``llama_cpp_backend``) -> the module that provides it.
MODULES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}

#: The default model of the llama.cpp benchmarks, as ``POST /v1/models`` takes it.
GEMMA = {"model_name": "gemma-3-270m", "model_engine": "llama.cpp", "model_format": "ggufv2",
         "quantization": "Q4_K_M"}


def gemma_path() -> str:
    """The default model's GGUF file in xdask's cache (fetched or unpacked there if needed)."""
    from xdask.hub import locate_model
    from xdask.registry import resolve

    return str(locate_model(resolve(GEMMA["model_name"], GEMMA["model_format"], None, GEMMA["quantization"])))


def inprocess_xllamacpp(path: str, n_parallel: int, n_ctx: int) -> tuple[Complete, Callable[[], None]]:
    """(``complete``, ``close``) of xllamacpp's server object with ``n_parallel`` slots."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    params.cpuparams.n_threads = cores()
    params.cpuparams_batch.n_threads = cores()
    params.verbosity = -1
    server: Any = xllamacpp.Server(params)

    def complete(prompt: str, max_tokens: int) -> Reply:
        out: list[Any] = []
        server.handle_completions({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, out.append)
        return Reply(out[-1]["usage"]["completion_tokens"])

    def close() -> None:
        nonlocal server
        server = None  # the library frees the model when the object goes

    return complete, close


def inprocess_llama_cpp_python(path: str, n_ctx: int) -> tuple[Complete, Callable[[], None]]:
    """(``complete``, ``close``) of ``llama_cpp.Llama``, serialized by a lock."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=cores(), n_threads_batch=cores(), verbose=False)
    lock = threading.Lock()

    def complete(prompt: str, max_tokens: int) -> Reply:
        with lock:
            return Reply(llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)["usage"]
                         ["completion_tokens"])

    return complete, llm.close
