"""Settings shared by both llama.cpp backends, read from kwargs then config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xdask import config
from xdask.errors import InvalidRequestError


@dataclass(frozen=True)
class GpuSplit:
    """Where llama.cpp puts a model among the GPUs it sees (``llama_model_params`` fields).

    llama.cpp numbers its devices in this process's CUDA order, the same
    ordinals placement books, so a replica is pinned without touching
    ``CUDA_VISIBLE_DEVICES`` (other models share the process).
    """

    #: The device for the whole model (split mode "none") or for scratch and small tensors.
    main_gpu: int
    #: llama.cpp's split mode: "none" (one device), "layer" or "row".
    split_mode: str
    #: Share of the layers per device ordinal; () keeps llama.cpp's default
    #: (in proportion to each device's free memory).
    tensor_split: tuple[float, ...] = ()

    @property
    def mode_constant(self) -> str:
        """The name both bindings give the split mode (``LLAMA_SPLIT_MODE_NONE``)."""
        return f"LLAMA_SPLIT_MODE_{self.split_mode.upper()}"


def gpu_split(gpu_idx: Sequence[int] | None) -> GpuSplit | None:
    """The split for the GPUs placement booked; None keeps llama.cpp's defaults.

    One GPU: the whole model on it (split mode "none"; llama.cpp's default
    "layer" would spread it over every GPU it sees, other replicas' too).
    Several: layers in equal shares on the booked ordinals only, none on the
    others. No GPU booked, or nothing placed: no split to choose.

    Examples
    --------
    >>> gpu_split([1])
    GpuSplit(main_gpu=1, split_mode='none', tensor_split=())
    >>> gpu_split([1, 3]).tensor_split
    (0.0, 1.0, 0.0, 1.0)
    """
    if not gpu_idx:
        return None
    if len(gpu_idx) == 1:
        return GpuSplit(main_gpu=gpu_idx[0], split_mode="none")
    shares = [0.0] * (max(gpu_idx) + 1)
    for i in gpu_idx:
        shares[i] = 1.0
    return GpuSplit(main_gpu=gpu_idx[0], split_mode="layer", tensor_split=tuple(shares))


def padded_split(shares: Sequence[float], size: int) -> list[float]:
    """``shares`` as the fixed-size array a binding takes (its build's maximum device count)."""
    if len(shares) > size:
        raise InvalidRequestError(
            f"GPU index {len(shares) - 1} is beyond the {size} devices this llama.cpp build supports",
            param="gpu_idx",
        )
    return [*shares, *[0.0] * (size - len(shares))]


@dataclass(frozen=True)
class LlamaCppOptions:
    """Context, slots, threads and devices for one loaded GGUF model.

    ``n_ctx`` is the total context; both backends split it between
    ``n_parallel`` slots (sequences decoded together), so by default each slot
    gets ``n-ctx-per-slot`` tokens, capped by the model's own context length.
    """

    n_ctx: int
    n_parallel: int
    n_threads: int
    #: Layers offloaded to GPUs, as the user set it; None: all of them (-1),
    #: or none on a replica placed without a GPU.
    n_gpu_layers: int | None = None
    #: The GPU ordinals placement booked (``placed``); None: not placed.
    gpu_idx: tuple[int, ...] | None = None

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
        n_gpu_layers = kwargs.pop("n_gpu_layers", None)
        return cls(
            n_ctx=n_ctx,
            n_parallel=n_parallel,
            n_threads=n_threads,
            n_gpu_layers=None if n_gpu_layers is None else int(n_gpu_layers),
        )

    def placed(self, gpu_idx: Sequence[int] | None) -> LlamaCppOptions:
        """These options on the GPUs placement booked; 400 if ``n_gpu_layers`` contradicts them.

        An explicit ``n_gpu_layers`` wins (0 on a GPU replica runs it on the
        CPU), except that a replica booked no GPU cannot offload layers.
        """
        if gpu_idx is None:
            return self
        if not gpu_idx and self.n_gpu_layers:
            raise InvalidRequestError(
                f"n_gpu_layers={self.n_gpu_layers} offloads layers to a GPU, but this replica was placed "
                "without one (n_gpu=0); leave n_gpu_layers unset (or 0), or launch with n_gpu >= 1",
                param="n_gpu_layers", code="invalid_engine_option",
            )
        return dataclasses.replace(self, gpu_idx=tuple(gpu_idx))

    @property
    def offload_layers(self) -> int:
        """``n_gpu_layers`` to pass to llama.cpp (-1: all)."""
        if self.n_gpu_layers is not None:
            return self.n_gpu_layers
        return 0 if self.gpu_idx == () else -1

    @property
    def split(self) -> GpuSplit | None:
        """How the model is spread over the booked GPUs (None: llama.cpp's defaults)."""
        return gpu_split(self.gpu_idx)
