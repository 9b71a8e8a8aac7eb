"""Inference engines behind one ``Engine`` protocol, chosen per model spec and host.

Engines are imported lazily: a worker needs only the engine it runs, and the
server (which runs none) imports none of them. Which engines exist and where
their code lives is the table in ``xdask.engines.table``; which engine can
run what, and why not, is in ``xdask.engines.matrix``; what this host's GPUs
are is in ``xdask.engines.host``.
"""

from __future__ import annotations

import importlib
from typing import Any

from xdask.engines.base import Delta, Emit, Engine, SamplingParams, TaskEngine
from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.matrix import check_engine, choose, collect_host_facts, engines_for, family_matrix, why_not
from xdask.engines.table import ENGINES, EngineInfo, canonical_engine
from xdask.errors import EngineUnavailableError
from xdask.registry.specs import ResolvedModel


def create_engine(
    resolved: ResolvedModel,
    model_engine: str,
    model_path: str,
    engine_kwargs: dict[str, Any],
    gpu_idx: list[int] | None = None,
) -> Engine | TaskEngine:
    """Build the engine object (not yet loaded) on the worker that will run it.

    ``model_engine`` is a canonical name (``check_engine`` gave it); the
    table names the module whose ``make_engine`` builds it for the model's
    type, and only that module is imported.

    ``gpu_idx``: the GPU ordinals placement booked for this replica, as this
    worker process sees them (``[]``: a CPU replica; None: nothing placed,
    the engine's own defaults). Each engine turns them into its own settings
    (``xdask.engines.devices``); options the user set explicitly win, and one
    that contradicts the placement is a 400 that says why.
    """
    gpu_idx = normalize_gpu_idx(gpu_idx)
    info = ENGINES.get(model_engine)
    if info is None:
        raise EngineUnavailableError(f"Unknown engine {model_engine!r}")
    model_type = resolved.family.model_type
    module = info.module_for(model_type)
    if module is None:
        raise EngineUnavailableError(f"Engine {model_engine!r} does not serve {model_type} models")
    return importlib.import_module(module).make_engine(resolved, model_path, dict(engine_kwargs), gpu_idx=gpu_idx)


__all__ = [
    "ENGINES",
    "Delta",
    "Emit",
    "Engine",
    "EngineInfo",
    "SamplingParams",
    "TaskEngine",
    "canonical_engine",
    "check_engine",
    "choose",
    "collect_host_facts",
    "create_engine",
    "engines_for",
    "family_matrix",
    "why_not",
]
