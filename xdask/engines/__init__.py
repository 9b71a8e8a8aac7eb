"""Inference engines behind one ``Engine`` protocol, chosen per model spec and host.

Engines are imported lazily: a worker needs only the engine it runs, and the
server (which runs none) imports none of them. Which engine can run what,
and why not, is in ``xdask.engines.matrix``.
"""

from __future__ import annotations

import importlib
from typing import Any

from xdask.engines.base import Delta, Emit, Engine, SamplingParams, TaskEngine
from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.matrix import ENGINES, canonical_engine, choose, why_not
from xdask.errors import EngineUnavailableError, InvalidRequestError
from xdask.registry.specs import ResolvedModel

#: Engine name -> the model formats it loads.
ENGINE_FORMATS: dict[str, tuple[str, ...]] = {name: info.formats for name, info in ENGINES.items()}

#: (model type, engine) -> module with ``make_engine(resolved, model_path, kwargs, gpu_idx=None)``
#: returning a ``TaskEngine`` (embeddings, rerank, images, audio).
_TASK_ENGINE_MODULES = {
    ("embedding", "sentence_transformers"): "xdask.engines.embedding",
    ("rerank", "sentence_transformers"): "xdask.engines.rerank",
    ("image", "diffusers"): "xdask.engines.image",
    ("audio", "transformers"): "xdask.engines.audio",
}

#: Engine name -> module with ``make_engine(model_path, context_length, kwargs, gpu_idx=None)``.
_ENGINE_MODULES = {
    "transformers": "xdask.engines.transformers",
    "vllm": "xdask.engines.vllm_engine",
    "sglang": "xdask.engines.sglang_engine",
    "mlx": "xdask.engines.mlx_engine",
}


def engines_for(resolved: ResolvedModel) -> list[str]:
    """Engine names that can load this spec's format (installed or not)."""
    fmt = resolved.spec.model_format
    return [name for name, formats in ENGINE_FORMATS.items() if fmt in formats]


def _alternatives(resolved: ResolvedModel, hosts: list[dict[str, Any]]) -> str:
    """The (engine, format) pairs of this family that would run on these hosts."""
    pairs = sorted(
        {
            f"{engine} + {spec.model_format}"
            for spec in resolved.family.model_specs
            for engine in ENGINES
            if any(why_not(engine, spec.model_format, h, resolved.family.model_type) is None for h in hosts)
        }
    )
    return f" Combinations of {resolved.family.model_name} that can run here: {', '.join(pairs) or 'none'}."


def check_engine(resolved: ResolvedModel, model_engine: str | None, hosts: list[dict[str, Any]]) -> str:
    """Validate (or pick) the engine for a launch; 400 with the reason if it cannot run.

    ``hosts`` are the workers' host facts (``matrix.collect_host_facts``);
    the engine must be able to run on at least one of them.
    """
    fmt = resolved.spec.model_format
    model_type = resolved.family.model_type
    if not hosts:
        raise EngineUnavailableError("The cluster has no workers to run a model on")
    if model_engine is None:
        for host in hosts:
            engine, _ = choose(fmt, host, model_type)
            if engine is not None:
                return engine
        _, reasons = choose(fmt, hosts[0], model_type)
        detail = "; ".join(reasons.values())
        raise EngineUnavailableError(
            f"No engine can run {resolved.family.model_name} ({fmt}) on this cluster: {detail}."
            + _alternatives(resolved, hosts),
            param="model_engine",
        )
    engine = canonical_engine(model_engine)
    if engine is None:
        raise EngineUnavailableError(
            f"Unknown engine {model_engine!r}; known engines: {', '.join(ENGINES)}", param="model_engine"
        )
    reasons = [why_not(engine, fmt, h, model_type) for h in hosts]
    if all(r is not None for r in reasons):
        raise EngineUnavailableError(
            f"Model {resolved.family.model_name} ({fmt}) cannot run on engine {engine}: {reasons[0]}."
            + _alternatives(resolved, hosts),
            param="model_engine",
        )
    return engine


def create_engine(
    resolved: ResolvedModel,
    model_engine: str,
    model_path: str,
    engine_kwargs: dict[str, Any],
    gpu_idx: list[int] | None = None,
) -> Engine | TaskEngine:
    """Build the engine object (not yet loaded) on the worker that will run it.

    ``gpu_idx``: the GPU ordinals placement booked for this replica, as this
    worker process sees them (``[]``: a CPU replica; None: nothing placed,
    the engine's own defaults). Each engine turns them into its own settings
    (``xdask.engines.devices``); options the user set explicitly win, and one
    that contradicts the placement is a 400 that says why.
    """
    kwargs = dict(engine_kwargs)
    gpu_idx = normalize_gpu_idx(gpu_idx)
    model_type = resolved.family.model_type
    if model_type != "LLM":
        task_module = _TASK_ENGINE_MODULES.get((model_type, model_engine))
        if task_module is None:
            raise EngineUnavailableError(f"Engine {model_engine!r} does not serve {model_type} models")
        return importlib.import_module(task_module).make_engine(resolved, model_path, kwargs, gpu_idx=gpu_idx)
    if model_engine == "llama.cpp":
        from xdask.engines.llama_cpp import choose_backend, make_engine
        from xdask.engines.llama_cpp.options import LlamaCppOptions

        backend = choose_backend(kwargs.pop("llama_cpp_backend", None))
        options = LlamaCppOptions.build(resolved.family.context_length, kwargs)
        if kwargs:  # build() took the ones it knows
            raise InvalidRequestError(
                f"Invalid llama.cpp options: unknown option(s) {', '.join(map(repr, sorted(kwargs)))}. "
                "Options llama.cpp accepts: llama_cpp_backend, n_ctx, n_gpu_layers, n_parallel, n_threads",
                param="engine_kwargs", code="invalid_engine_option",
            )
        return make_engine(model_path, backend, {"options": options}, gpu_idx=gpu_idx)
    module_name = _ENGINE_MODULES.get(model_engine)
    if module_name is None:
        raise EngineUnavailableError(f"Unknown engine {model_engine!r}")
    module = importlib.import_module(module_name)
    return module.make_engine(model_path, resolved.family.context_length, kwargs, gpu_idx=gpu_idx)


__all__ = [
    "ENGINE_FORMATS",
    "Delta",
    "Emit",
    "Engine",
    "SamplingParams",
    "TaskEngine",
    "check_engine",
    "create_engine",
    "engines_for",
]
