"""Inference engines behind one ``Engine`` protocol, chosen per model spec.

Engines are imported lazily: a worker needs only the engine it runs, and the
server (which runs none) imports none of them.
"""

from __future__ import annotations

from typing import Any

from xdask.engines.base import Delta, Emit, Engine, SamplingParams
from xdask.errors import EngineUnavailableError
from xdask.registry.specs import ResolvedModel

#: Engine name -> the model formats it loads.
ENGINE_FORMATS: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("ggufv2", "gguf"),
}


def engines_for(resolved: ResolvedModel) -> list[str]:
    """Engine names that can load this spec's format."""
    fmt = resolved.spec.model_format
    return [name for name, formats in ENGINE_FORMATS.items() if fmt in formats]


def check_engine(resolved: ResolvedModel, model_engine: str | None) -> str:
    """Validate (or pick) the engine for a launch; 400 if it cannot run the spec."""
    candidates = engines_for(resolved)
    if model_engine is None:
        if not candidates:
            raise EngineUnavailableError(f"No engine loads format {resolved.spec.model_format!r}")
        return candidates[0]
    normalized = {"llama-cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}.get(
        model_engine.lower(), model_engine
    )
    if normalized not in ENGINE_FORMATS:
        raise EngineUnavailableError(
            f"Unknown engine {model_engine!r}; known engines: {', '.join(ENGINE_FORMATS)}", param="model_engine"
        )
    if normalized not in candidates:
        raise EngineUnavailableError(
            f"Engine {normalized!r} cannot load format {resolved.spec.model_format!r}", param="model_engine"
        )
    return normalized


def create_engine(
    resolved: ResolvedModel, model_engine: str, model_path: str, engine_kwargs: dict[str, Any]
) -> Engine:
    """Build the engine object (not yet loaded) on the worker that will run it."""
    kwargs = dict(engine_kwargs)
    if model_engine == "llama.cpp":
        from xdask.engines.llama_cpp import choose_backend, make_engine
        from xdask.engines.llama_cpp.options import LlamaCppOptions

        backend = choose_backend(kwargs.pop("llama_cpp_backend", None))
        options = LlamaCppOptions.build(
            resolved.family.context_length, kwargs, batching=(backend == "xllamacpp")
        )
        return make_engine(model_path, backend, {"options": options})
    raise EngineUnavailableError(f"Unknown engine {model_engine!r}")


__all__ = [
    "Delta",
    "ENGINE_FORMATS",
    "Emit",
    "Engine",
    "SamplingParams",
    "check_engine",
    "create_engine",
    "engines_for",
]
