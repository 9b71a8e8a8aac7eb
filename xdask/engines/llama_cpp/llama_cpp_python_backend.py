"""llama-cpp-python backend: the ``Llama`` class, one sequence at a time.

``Llama`` is not thread-safe, so requests take a lock in arrival order (a
correct queue, no batching); the model actor still accepts them all at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from xdask.engines.base import Delta, Emit, SamplingParams
from xdask.engines.llama_cpp.gguf_engine import GGUFEngineBase
from xdask.engines.llama_cpp.options import LlamaCppOptions
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

#: llama-cpp-python's own default is 0.8; OpenAI's (which clients expect) is 1.
_OPENAI_DEFAULT_TEMPERATURE = 1.0


class _FifoLock:
    """A lock that admits waiters in arrival order (threading.Lock does not)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class LlamaCppPythonEngine(GGUFEngineBase):
    """A GGUF model served by llama-cpp-python's ``Llama``.

    Examples
    --------
    >>> eng = LlamaCppPythonEngine("/path/model.gguf", options)   # doctest: +SKIP
    >>> eng.load()
    >>> eng.generate("Hello", SamplingParams(max_tokens=8), print)
    """

    backend: ClassVar[str] = "llama-cpp-python"

    def __init__(self, model_path: str, options: LlamaCppOptions):
        # The actor may hand over many requests at once; they wait in _queue.
        super().__init__(model_path, options, max_concurrency=64)
        self._llm: Any = None
        self._queue = _FifoLock()

    def load(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelLoadError("llama-cpp-python is not installed") from exc
        try:
            self._llm = Llama(
                model_path=self.model_path,
                n_ctx=self.options.n_ctx,
                n_threads=self.options.n_threads,
                n_threads_batch=self.options.n_threads,
                n_gpu_layers=self.options.n_gpu_layers,
                verbose=False,
            )
        except Exception as exc:
            raise ModelLoadError(f"llama-cpp-python could not load {self.model_path}: {exc}") from exc

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        with self._queue:
            llm = self._llm
            if llm is None:
                raise GenerationError("the model is closed")
            prompt_tokens = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
            temperature = params.temperature if params.temperature is not None else _OPENAI_DEFAULT_TEMPERATURE
            kwargs: dict[str, Any] = {
                "max_tokens": params.max_tokens,
                "temperature": temperature,
                "stop": list(params.stop) or None,
                "stream": True,
            }
            kwargs.update(params.optional_fields(exclude=("temperature",)))
            completion_tokens = 0
            finish: str | None = None
            stream = llm.create_completion(prompt, **kwargs)
            try:
                for chunk in stream:
                    choice = chunk["choices"][0]
                    finish = choice.get("finish_reason")
                    text = choice.get("text") or ""
                    if text:
                        completion_tokens += 1
                        if emit(Delta(text=text)):
                            finish = "abort"
                            break
            except ValueError as exc:  # llama-cpp-python's word for "prompt too long"
                raise InvalidRequestError(str(exc), param="messages") from exc
            finally:
                stream.close()
            if finish != "abort":
                emit(
                    Delta(
                        text="",
                        finish_reason=finish or "stop",
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                    )
                )

    def close(self) -> None:
        with self._queue:
            llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()
