"""transformers engine: any causal LM ``transformers`` loads (HF safetensors, GGUF), CPU or CUDA."""

from __future__ import annotations

from typing import Any

from xdask.engines.transformers.options import TransformersOptions


def make_engine(model_path: str, context_length: int, kwargs: dict[str, Any]) -> Any:
    """Build (not load) the engine; unknown options are a 400."""
    from xdask.engines.transformers.engine import TransformersEngine

    return TransformersEngine(model_path, TransformersOptions.from_kwargs("transformers", kwargs), context_length)


__all__ = ["TransformersOptions", "make_engine"]
