"""A rough estimate of the memory one model replica needs, checked before placing it.

Why estimate at all: a launch that cannot fit should be refused at once with
the numbers, not die minutes later with the worker's out-of-memory kill. The
estimate is deliberately simple (weights at their stored precision, plus a
margin for the KV cache, activations and the runtime) and can be turned off
with ``xdask.placement.check-memory: false``.
"""

from __future__ import annotations

import re

from xdask import config
from xdask.registry.specs import ResolvedModel

#: Bits per weight of llama.cpp quantization types (weights only, rounded up).
_GGUF_BITS = {
    "Q2_K": 3.4, "Q3_K": 4.3, "Q4_0": 4.6, "Q4_1": 5.0, "Q4_K": 4.9, "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K": 5.7,
    "Q6_K": 6.6, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0, "F32": 32.0, "IQ4_XS": 4.3, "IQ4_NL": 4.6,
}


def bits_per_weight(model_format: str, quantization: str | None, on_gpu: bool) -> float:
    """Stored bits per parameter for a format and quantization."""
    quant = (quantization or "").upper()
    if model_format in ("ggufv2", "gguf"):
        for name, bits in _GGUF_BITS.items():
            if quant.startswith(name):
                return bits
        return 6.0
    if model_format in ("awq", "gptq"):
        return 4.5
    if model_format == "fp8":
        return 8.0
    if model_format == "mlx":
        m = re.match(r"(\d+)BIT", quant)
        return float(m.group(1)) + 0.5 if m else 16.0
    # pytorch/safetensors: bf16 on a GPU, float32 on the CPU (the transformers engine's defaults).
    return 16.0 if on_gpu else 32.0


def estimate_replica_bytes(resolved: ResolvedModel, on_gpu: bool) -> int:
    """Bytes one replica is expected to take, or 0 when the size is unknown or checks are off."""
    if not config.get("placement.check-memory", True):
        return 0
    size = resolved.spec.model_size_in_billions
    try:
        params = float(str(size).replace("_", ".")) * 1e9
    except (TypeError, ValueError):
        return 0
    weights = params * bits_per_weight(resolved.spec.model_format, resolved.quantization, on_gpu) / 8
    margin = float(config.get("placement.memory-margin", 1.2))
    runtime = int(config.get("placement.runtime-bytes", 256 * 2**20))
    return int(weights * margin) + runtime
