"""Settings shared by both llama.cpp backends, read from kwargs then config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from xdask import config


@dataclass(frozen=True)
class LlamaCppOptions:
    """Context, slots and threads for one loaded GGUF model.

    ``n_ctx`` is the total context; both backends split it between
    ``n_parallel`` slots (sequences decoded together), so by default each slot
    gets ``n-ctx-per-slot`` tokens, capped by the model's own context length.
    """

    n_ctx: int
    n_parallel: int
    n_threads: int
    n_gpu_layers: int

    @classmethod
    def build(cls, context_length: int, kwargs: dict[str, Any]) -> LlamaCppOptions:
        """Options from launch ``kwargs`` (popped) and ``xdask.llama-cpp.*`` config.

        Both backends decode ``n_parallel`` sequences together.
        """
        n_parallel = max(1, int(kwargs.pop("n_parallel", config.get("llama-cpp.n-parallel")) or 1))
        per_slot = min(int(config.get("llama-cpp.n-ctx-per-slot")), context_length)
        n_ctx = int(kwargs.pop("n_ctx", per_slot * n_parallel))
        n_threads = int(kwargs.pop("n_threads", config.get("llama-cpp.n-threads")) or 0)
        if n_threads <= 0:
            n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n_gpu_layers = int(kwargs.pop("n_gpu_layers", -1))
        return cls(n_ctx=n_ctx, n_parallel=n_parallel, n_threads=n_threads, n_gpu_layers=n_gpu_layers)

