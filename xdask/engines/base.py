"""The ``Engine`` protocol: what every inference engine gives xdask.

An engine turns a prompt and sampling parameters into text, calling ``emit``
with each piece as it is produced. Engines are synchronous and are called
from worker threads (one per in-flight request): an engine that can batch
(xllamacpp's slots, vLLM, SGLang) serves those threads at once; one that
cannot (llama-cpp-python) serializes them itself. Chat is built on top of
``generate`` by the model actor with the family's chat template, so an
engine implements one generation entry point.

Examples
--------
>>> class EchoEngine:                        # doctest: +SKIP
...     name = "echo"
...     adds_bos = False
...     max_concurrency = 4
...     chat_template = None
...     special_tokens = {}
...     def load(self): ...
...     def generate(self, prompt, params, emit):
...         emit(Delta(text=prompt, finish_reason="stop", prompt_tokens=1, completion_tokens=1))
...     def close(self): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings common to every engine (OpenAI's names)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def optional_fields(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The optional settings that were given, by OpenAI name (for engine calls)."""
        names = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
        return {n: getattr(self, n) for n in names if n not in exclude and getattr(self, n) is not None}


@dataclass
class Delta:
    """A piece of generated text; the last one has ``finish_reason`` and usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


Emit = Callable[[Delta], bool]
"""Receives each delta; returns True when the consumer is gone (stop generating)."""


@runtime_checkable
class Engine(Protocol):
    """One loaded model behind a uniform, thread-callable generation API."""

    name: ClassVar[str]
    #: Whether tokenizing a prompt adds BOS itself (then templates must not).
    adds_bos: bool
    #: How many requests the engine serves at once; more wait in its queue.
    max_concurrency: int
    #: The chat template found in the model files (tokenizer_config.json, GGUF
    #: metadata), used when the family spec carries none; None if there is none.
    chat_template: str | None
    #: Special tokens a chat template may name (``bos_token``, ``eos_token``).
    special_tokens: dict[str, str]

    def load(self) -> None:
        """Load weights; raise ``ModelLoadError`` with the engine's reason."""

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        """Generate for ``prompt``, calling ``emit`` per piece; blocks its thread."""

    def close(self) -> None:
        """Free the model's memory; the engine is unusable afterwards."""

    def describe(self) -> dict[str, Any]:
        """Engine facts for ``GET /v1/models/{uid}`` (backend, slots, ...)."""


@runtime_checkable
class TaskEngine(Protocol):
    """A non-generative model (embedding, rerank, image, audio) behind one thread-callable entry point.

    Why one ``invoke`` instead of a method per task: the actor, the stream
    op, routing and the batch runner move ``(op, payload) -> result`` without
    knowing the model type; each engine names the ops it serves in ``ops``
    (``embed``, ``rerank``, ``text_to_image``, ``image_to_image``,
    ``transcribe``, ``translate``, ``speech``). Payloads and results are
    msgpack-friendly dicts (bytes allowed, no numpy arrays).
    """

    #: How many invocations run at once (threads of the actor's pool).
    max_concurrency: int
    #: The ops this model serves.
    ops: frozenset[str]

    def load(self) -> None:
        """Load weights; raise ``ModelLoadError`` with the engine's reason."""

    def invoke(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one op; blocks its thread. Bad input raises ``InvalidRequestError``."""

    def close(self) -> None:
        """Free the model's memory; the engine is unusable afterwards."""

    def describe(self) -> dict[str, Any]:
        """Engine facts for ``GET /v1/models/{uid}`` (backend, device, dimensions, ...)."""
