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

The SwiGLU ``silu(gate) * up`` and, for decode steps only, the rotary
embedding are fused the same way (rotary inputs of prefill are strided
views whose layout changes with the prompt length: compiling those hit
dynamo's recompile limit on the H100).

Applied only to architectures whose RMSNorm is the plain Llama formulation
(not Gemma's ``1 + weight``), and only to CUDA tensors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Fused kernels serve decode steps of at most this many sequences (one token each): there the
#: step is launch-bound. Larger batches and prefills run the eager kernels, which were faster for them
#: (H100: 128 streams 3,850 tok/s fused everywhere vs 5,901 eager) and need no new compilations.
MAX_FUSED_ROWS = 16


def _small_decode(x: Any) -> bool:
    return x.is_cuda and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_FUSED_ROWS


#: RMSNorm classes with Llama's formula: weight * (x * rsqrt(mean(x^2) + eps)).
_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def _rope(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> tuple[Any, Any]:
    import torch

    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x: Any) -> Any:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _silu_mul(gate: Any, up: Any) -> Any:
    import torch

    return torch.nn.functional.silu(gate) * up


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@functools.cache
def _compiled(name: str) -> Any:
    import torch

    kernels: dict[str, Callable[..., Any]] = {"rms_norm": _rms_norm, "rope": _rope, "silu_mul": _silu_mul}
    return torch.compile(kernels[name], dynamic=True, fullgraph=False)


def fuse_small_kernels(model: Any) -> list[str]:
    """Route the model's RMSNorms through a fused kernel; returns what was fused."""
    fused: list[str] = []
    norm = _compiled("rms_norm")
    n_norms = 0
    for module in model.modules():
        if type(module).__name__ in _NORMS and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            eager = module.forward

            def forward(hidden_states: Any, _m: Any = module, _eager: Any = eager) -> Any:
                if _small_decode(hidden_states):
                    return norm(hidden_states, _m.weight, float(_m.variance_epsilon))
                return _eager(hidden_states)

            module.forward = forward
            n_norms += 1
    if n_norms:
        fused.append(f"rms_norm x{n_norms}")
    fused += _fuse_mlp(model) + _fuse_rope(model)
    return fused


#: MLP classes computing down(silu(gate(x)) * up(x)).
_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
#: Modeling modules whose attention calls a module-level ``apply_rotary_pos_emb`` of Llama's form.
_ROTARY_MODULES = {
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.mistral.modeling_mistral",
}


def _fuse_mlp(model: Any) -> list[str]:
    silu_mul = _compiled("silu_mul")
    count = 0
    for module in model.modules():
        if type(module).__name__ in _MLPS and getattr(module.config, "hidden_act", "") in ("silu", "swish"):
            eager = module.forward

            def forward(x: Any, _m: Any = module, _eager: Any = eager) -> Any:
                if _small_decode(x):
                    return _m.down_proj(silu_mul(_m.gate_proj(x), _m.up_proj(x)))
                return _eager(x)

            module.forward = forward
            count += 1
    return [f"silu*mul x{count}"] if count else []


def _fuse_rope(model: Any) -> list[str]:
    """The rotary embedding of decode steps only (one query token).

    Prefill inputs are strided views whose layout varies with the prompt
    length; compiling for them hit dynamo's recompile limit on the H100, and
    prefill is not launch-bound anyway.
    """
    import sys

    # Any: the model's modeling module, whose rotary function is read and patched by name.
    modeling: Any = sys.modules.get(type(model).__module__)
    if modeling is None or modeling.__name__ not in _ROTARY_MODULES or not hasattr(modeling, "apply_rotary_pos_emb"):
        return []
    eager_rope = modeling.apply_rotary_pos_emb
    if not getattr(eager_rope, "_xdask_fused", False):
        rope = _compiled("rope")

        def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
            if q.is_cuda and q.shape[-2] == 1 and q.shape[0] <= MAX_FUSED_ROWS and unsqueeze_dim == 1:
                return rope(q, k, cos, sin, 1)
            return eager_rope(q, k, cos, sin, unsqueeze_dim)

        apply_rotary_pos_emb._xdask_fused = True  # type: ignore[attr-defined]
        apply_rotary_pos_emb._xdask_eager = eager_rope  # type: ignore[attr-defined]
        modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return ["rotary (decode)"]


def unfuse(model: Any) -> None:
    """Undo ``fuse_small_kernels`` (when compiling failed): the eager forwards and rotary again."""
    import sys

    for module in model.modules():
        module.__dict__.pop("forward", None)
    modeling: Any = sys.modules.get(type(model).__module__)
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None and getattr(rope, "_xdask_fused", False):
        modeling.apply_rotary_pos_emb = rope._xdask_eager
