"""Fused RMSNorm kernels for the transformers engine's decode steps on CUDA.

Why: a decode step of a small model at batch 1 is bound by the number of
kernels it launches, even replayed from a CUDA graph (each costs a few
microseconds on the GPU): Qwen2-0.5B's step is ~1,000 kernels, 3.7 ms on an
H100, and transformers' eager RMSNorm is 7 elementwise kernels, twice a
layer. ``torch.compile`` turns it into one fused Triton kernel. Only this
pure function is compiled (dynamic shapes; a few specializations: batch and
length 1 or more), so the model still runs eagerly and under our own CUDA
graphs. ``fullgraph=False``: should dynamo ever give up (recompile limit),
it falls back to eager code instead of failing a request.

A first version also fused the rotary embedding: its inputs are strided
views whose layouts differ between prefill and decode, and it hit dynamo's
recompile limit on the H100, so it is not fused.

Applied only to architectures whose RMSNorm is the plain Llama formulation
(not Gemma's ``1 + weight``), and only to CUDA tensors.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: RMSNorm classes with Llama's formula: weight * (x * rsqrt(mean(x^2) + eps)).
_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@functools.cache
def _compiled(name: str) -> Any:
    import torch

    fn = {"rms_norm": _rms_norm}[name]
    return torch.compile(fn, dynamic=True, fullgraph=False)


def fuse_small_kernels(model: Any) -> list[str]:
    """Route the model's RMSNorms through a fused kernel; returns what was fused."""
    fused: list[str] = []
    norm = _compiled("rms_norm")
    n_norms = 0
    for module in model.modules():
        if type(module).__name__ in _NORMS and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            eager = module.forward

            def forward(hidden_states: Any, _m: Any = module, _eager: Any = eager) -> Any:
                if hidden_states.is_cuda:
                    return norm(hidden_states, _m.weight, float(_m.variance_epsilon))
                return _eager(hidden_states)

            module.forward = forward
            n_norms += 1
    if n_norms:
        fused.append(f"rms_norm x{n_norms}")
    return fused


def unfuse(model: Any) -> None:
    """Undo ``fuse_small_kernels`` (when compiling failed): the eager forwards again."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
