"""Launch options of the transformers engine."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from xdask.engines.options import EngineOptions
from xdask.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class TransformersOptions(EngineOptions):
    """What a launch may pass to the transformers engine (validated, unknown names are a 400)."""

    #: "auto": the GPU placement booked (``cuda:<i>``), or CUDA when torch sees a
    #: GPU and nothing was placed, else the CPU. "cuda" means the booked GPU.
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


def check_device(device: str, gpu_idx: list[int] | None, engine: str = "transformers") -> None:
    """400 when the ``device`` option contradicts the GPUs placement booked.

    The engine runs a replica on one device, so more than one booked GPU
    cannot be used. An explicit CUDA device must be the booked one: any
    other is booked for another replica, or none was booked (``n_gpu=0``).
    A non-CUDA device (``cpu``) is the user's choice and wins.
    """
    if gpu_idx is None:
        return
    if len(gpu_idx) > 1:
        raise InvalidRequestError(
            f"The {engine} engine runs a replica on one GPU, but {len(gpu_idx)} were booked ({gpu_idx}); "
            "use replicas, or vllm/sglang for tensor parallelism",
            param="n_gpu",
        )
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return
    if not gpu_idx:
        raise InvalidRequestError(
            f"device={device!r} asks for a GPU, but this replica was placed without one (n_gpu=0); "
            "leave device unset, or launch with n_gpu=1",
            param="device", code="invalid_engine_option",
        )
    if index and index != str(gpu_idx[0]):
        raise InvalidRequestError(
            f"device={device!r} is not the GPU booked for this replica (cuda:{gpu_idx[0]}); "
            "leave device unset (or 'cuda') to use the booked one, or launch with gpu_idx",
            param="device", code="invalid_engine_option",
        )


def choose_device(device: str, gpu_idx: list[int] | None, cuda: bool, engine: str = "transformers") -> str:
    """The torch device for the ``device`` option on the GPUs placement booked.

    ``cuda``: whether torch sees CUDA here. The device is selected by index
    (``cuda:1``): other models share the worker process, so
    ``CUDA_VISIBLE_DEVICES`` is left alone. Without CUDA (a CPU host, where
    GPU indices are only labels) a booked GPU falls back to the CPU, logged.

    Examples
    --------
    >>> choose_device("auto", [1], cuda=True)
    'cuda:1'
    >>> choose_device("auto", [], cuda=True)
    'cpu'
    >>> choose_device("auto", None, cuda=True)
    'cuda'
    """
    check_device(device, gpu_idx, engine)
    if gpu_idx is None:
        return device if device != "auto" else ("cuda" if cuda else "cpu")
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        return device  # an explicit non-CUDA device wins
    if not gpu_idx:
        return "cpu"
    if device == "auto" and not cuda:
        logger.warning("GPU %d was booked for this %s replica, but torch sees no CUDA: "
                       "running on the CPU", gpu_idx[0], engine)
        return "cpu"
    return f"cuda:{gpu_idx[0]}"
