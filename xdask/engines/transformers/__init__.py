"""transformers engine: any causal LM ``transformers`` loads (HF safetensors, GGUF), CPU or CUDA."""

from __future__ import annotations

from typing import Any

from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.transformers.options import TransformersOptions, check_device
from xdask.registry.specs import ResolvedModel


def build_engine(
    model_path: str, context_length: int, kwargs: dict[str, Any], gpu_idx: list[int] | None = None
) -> Any:
    """Build (not load) the engine for a model folder; unknown options, or a device that contradicts
    ``gpu_idx``, are a 400.

    ``gpu_idx``: the GPU placement booked (one at most; ``[]``: the CPU;
    None: not placed, CUDA if torch sees it).
    """
    from xdask.engines.transformers.engine import TransformersEngine

    options = TransformersOptions.from_kwargs("transformers", kwargs)
    gpu_idx = normalize_gpu_idx(gpu_idx)
    check_device(options.device, gpu_idx)  # now, not at load: a launch error is a 400
    return TransformersEngine(model_path, options, context_length, gpu_idx)


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> Any:
    """The engine table's entry point: ``build_engine`` with the family's context length."""
    return build_engine(model_path, resolved.context_length, kwargs, gpu_idx)


__all__ = ["TransformersOptions", "build_engine", "make_engine"]
