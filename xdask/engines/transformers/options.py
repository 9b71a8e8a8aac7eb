"""Launch options of the transformers engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xdask.engines.options import EngineOptions


class TransformersOptions(EngineOptions):
    """What a launch may pass to the transformers engine (validated, unknown names are a 400)."""

    #: "auto": CUDA when torch sees a GPU, else the CPU.
    device: str = "auto"
    #: "auto": bfloat16 on CUDA, float32 on the CPU (bf16 matmuls are slow on most CPUs).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    #: Sequences decoded together in one forward pass.
    max_batch_size: int = Field(default=0, ge=0, description="0: 256 on CUDA, 32 on the CPU")
    #: Prompt tokens (padded) admitted in one prefill pass; bounds the latency a new
    #: request adds to running ones.
    max_prefill_tokens: int = Field(default=4096, ge=16)
    #: Context length served; 0: the family's context length capped by the model config.
    max_model_len: int = Field(default=0, ge=0)
    #: CPU threads for torch; 0: all cores of the worker.
    n_threads: int = Field(default=0, ge=0)
    #: KV layout: "slots" (preallocated per-sequence rows, CUDA graphs for decode steps)
    #: or "dynamic" (a growing left-padded cache). "auto": slots on CUDA when the model
    #: has no sliding-window layers, dynamic otherwise.
    kv_layout: Literal["auto", "dynamic", "slots"] = "auto"
    #: Replay decode steps from captured CUDA graphs (slots layout on CUDA only).
    cuda_graphs: bool = True
    #: Fuse RMSNorm and rotary-embedding kernels with torch.compile (CUDA, Llama/Qwen/Mistral only).
    fuse_kernels: bool = True
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    #: The model's own files are used offline when they are a local path.
    revision: str | None = None
