"""llama.cpp engine for GGUF models, with two backends.

``xllamacpp`` runs llama.cpp's own server loop in-process with parallel slots
(continuous batching); ``llama-cpp-python`` is the package most users know,
decoding one sequence at a time. ``XDASK_LLAMA_CPP_BACKEND`` (or the launch
kwarg ``llama_cpp_backend``) picks one; ``auto`` prefers xllamacpp.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from xdask import config
from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.llama_cpp.options import LlamaCppOptions
from xdask.errors import EngineUnavailableError, InvalidRequestError
from xdask.registry.specs import ResolvedModel

BACKENDS = ("xllamacpp", "llama-cpp-python")
_MODULES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}


def installed_backends() -> list[str]:
    """Backends importable here, in order of preference."""
    return [b for b in BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]


def choose_backend(requested: str | None = None) -> str:
    """The backend to use: the requested one, else config, else the first installed."""
    wanted = (requested or config.get("llama-cpp.backend") or "auto").lower().replace("_", "-")
    if wanted in ("llama-cpp", "llamacpp"):
        wanted = "llama-cpp-python"
    available = installed_backends()
    if wanted == "auto":
        if not available:
            raise EngineUnavailableError(
                "No llama.cpp backend is installed: pip install xllamacpp (or llama-cpp-python)"
            )
        return available[0]
    if wanted not in BACKENDS:
        raise EngineUnavailableError(f"Unknown llama.cpp backend {wanted!r}; choose one of {BACKENDS}")
    if wanted not in available:
        raise EngineUnavailableError(f"llama.cpp backend {wanted!r} is not installed on this worker")
    return wanted


def build_engine(model_path: str, backend: str, options: dict[str, Any], gpu_idx: list[int] | None = None) -> Any:
    """Build (not load) the engine object for ``backend`` and a GGUF file.

    ``options["options"]`` is a ``LlamaCppOptions``; ``gpu_idx`` (the GPUs
    placement booked, ``[]`` for none) pins the model to them
    (``LlamaCppOptions.placed``); None keeps llama.cpp's own device choice.
    """
    options = {**options, "options": options["options"].placed(normalize_gpu_idx(gpu_idx))}
    if backend == "xllamacpp":
        from xdask.engines.llama_cpp.xllamacpp_backend import XllamacppEngine

        return XllamacppEngine(model_path, **options)
    from xdask.engines.llama_cpp.llama_cpp_python_backend import LlamaCppPythonEngine

    return LlamaCppPythonEngine(model_path, **options)


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> Any:
    """The engine table's entry point: the backend, then the options, from launch ``kwargs``.

    ``llama_cpp_backend`` picks the backend (``choose_backend``); the rest are
    ``LlamaCppOptions.build``'s, where the family's context length caps each
    slot's default context. Any other option is a 400 that lists the accepted
    ones, since a typo would otherwise be silently ignored.
    """
    kwargs = dict(kwargs)
    backend = choose_backend(kwargs.pop("llama_cpp_backend", None))
    options = LlamaCppOptions.build(resolved.context_length, kwargs)
    if kwargs:  # build() took the ones it knows
        raise InvalidRequestError(
            f"Invalid llama.cpp options: unknown option(s) {', '.join(map(repr, sorted(kwargs)))}. "
            "Options llama.cpp accepts: llama_cpp_backend, n_ctx, n_gpu_layers, n_parallel, n_threads",
            param="engine_kwargs", code="invalid_engine_option",
        )
    return build_engine(model_path, backend, {"options": options}, gpu_idx=gpu_idx)
