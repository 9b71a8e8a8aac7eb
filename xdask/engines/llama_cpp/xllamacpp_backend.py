"""xllamacpp backend: llama.cpp's server loop in-process, with parallel slots.

Each request calls ``Server.handle_completions`` from its own thread; the
server loop batches all active slots into one decode step, so concurrent
requests share the CPU/GPU instead of queueing. No HTTP hop is involved.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from xdask.engines.base import Delta, Emit, SamplingParams
from xdask.engines.llama_cpp.gguf_engine import GGUFEngineBase
from xdask.engines.llama_cpp.options import LlamaCppOptions, padded_split
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)


class XllamacppEngine(GGUFEngineBase):
    """A GGUF model served by xllamacpp's in-process llama.cpp server.

    Examples
    --------
    >>> eng = XllamacppEngine("/path/model.gguf", options)        # doctest: +SKIP
    >>> eng.load()
    >>> eng.generate("Hello", SamplingParams(max_tokens=8), print)
    """

    backend: ClassVar[str] = "xllamacpp"

    def __init__(self, model_path: str, options: LlamaCppOptions):
        super().__init__(model_path, options, max_concurrency=options.n_parallel)
        self._server: Any = None

    def load(self) -> None:
        try:
            import xllamacpp
        except ImportError as exc:  # choose_backend checks first; this is a race with uninstall
            raise ModelLoadError("xllamacpp is not installed") from exc
        params = xllamacpp.CommonParams()
        params.model.path = self.model_path
        params.n_ctx = self.options.n_ctx
        params.n_parallel = self.options.n_parallel
        params.cpuparams.n_threads = self.options.n_threads
        params.cpuparams_batch.n_threads = self.options.n_threads
        params.n_gpu_layers = self.options.offload_layers
        split = self.options.split
        if split is not None:
            params.main_gpu = split.main_gpu
            params.split_mode = getattr(xllamacpp.llama_split_mode, split.mode_constant)
            if split.tensor_split:  # xllamacpp takes the whole array (its maximum device count)
                params.tensor_split = padded_split(split.tensor_split, len(params.tensor_split))
        params.verbosity = -1  # llama.cpp's per-slot timing lines would flood the worker log
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:
            raise ModelLoadError(f"xllamacpp could not load {self.model_path}: {exc}") from exc

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        server = self._server
        if server is None:
            raise GenerationError("the model is closed")
        request: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        request.update(params.optional_fields())
        if params.stop:
            request["stop"] = list(params.stop)
        error: dict[str, Any] = {}

        def on_chunk(chunk: Any) -> bool:
            if isinstance(chunk, list):  # some versions batch chunks
                return any(on_chunk(c) for c in chunk)
            if "error" in chunk:
                error.update(chunk["error"])
                return True
            choices = chunk.get("choices") or []
            usage = chunk.get("usage")
            text = choices[0].get("text", "") if choices else ""
            finish = choices[0].get("finish_reason") if choices else None
            delta = Delta(text=text or "", finish_reason=finish)
            if usage:
                delta.prompt_tokens = usage.get("prompt_tokens")
                delta.completion_tokens = usage.get("completion_tokens")
            if not delta.text and delta.finish_reason is None and usage is None:
                return False
            return bool(emit(delta))

        server.handle_completions(request, on_chunk)
        if error:
            message = error.get("message", "llama.cpp error")
            if error.get("code") == 400 or error.get("type") == "invalid_request_error":
                raise InvalidRequestError(message)
            raise GenerationError(message)

    def close(self) -> None:
        # Dropping the last reference stops llama.cpp's loop and frees the model.
        self._server = None
