"""What the torch task engines (``image`` on diffusers, ``audio`` on transformers) share.

Both run a pipeline object on one device, in the worker process beside other
models: the device comes from the GPU placement booked (``cuda:<i>``, never
``CUDA_VISIBLE_DEVICES``, see ``xdask.engines.devices``), the dtype from the
device (half precision on CUDA, float32 on the CPU, where half-precision
matmuls are slow or missing), and closing must hand the memory back while
the worker lives on.

Examples
--------
>>> opts = TorchTaskOptions.from_kwargs("diffusers", {"dtype": "float16"})
>>> opts.dtype, opts.max_concurrency
('float16', 1)
>>> dtype_name("auto", "cpu", "bfloat16")
'float32'
>>> dtype_name("auto", "cuda:0", "bfloat16")
'bfloat16'
"""

from __future__ import annotations

import gc
from typing import Any, ClassVar, Literal, Self

from pydantic import Field

from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.options import EngineOptions
from xdask.engines.transformers.options import check_device, choose_device
from xdask.registry.specs import ResolvedModel

#: dtype names an option or a family's ``default_model_config`` may give.
DTYPES = ("float32", "float16", "bfloat16")


class TorchTaskOptions(EngineOptions):
    """Launch options of a torch task engine (unknown names are a 400)."""

    #: "auto": the GPU placement booked, CUDA when torch sees it and nothing was placed, else the CPU.
    device: str = "auto"
    #: "auto": the family's ``torch_dtype`` or float16 on CUDA; float32 on the CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    #: Requests run at once on the model's threads. One call already fills the
    #: GPU or every core; more only interleave their steps (raise it on a large GPU).
    max_concurrency: int = Field(default=1, ge=1, le=64)


def pick_device(device: str, gpu_idx: list[int] | None, engine: str) -> str:
    """The torch device of a replica (``cpu``, ``cuda``, ``cuda:<i>``); see ``choose_device``."""
    import torch

    return choose_device(device, gpu_idx, torch.cuda.is_available(), engine)


def dtype_name(option: str, device: str, family_default: str | None = None) -> str:
    """The dtype a replica loads in: the option, else the family's choice on CUDA, else by device."""
    if option != "auto":
        return option
    if not device.startswith("cuda"):
        return "float32"
    return family_default if family_default in DTYPES else "float16"


def torch_dtype(name: str) -> Any:
    """``torch.float16`` for ``"float16"`` (and so on)."""
    import torch

    return getattr(torch, name)


def release(device: str) -> None:
    """Give a closed model's memory back: Python objects now, then CUDA's cached blocks."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class TorchTaskEngine:
    """Base of the torch task engines: what they are built from, where they run, and their description.

    Subclasses name their ``engine`` and ``options_class``, set ``ops`` and
    load in ``load`` (after ``place``), and free their pipelines in ``close``.
    """

    engine: ClassVar[str]
    options_class: ClassVar[type[TorchTaskOptions]] = TorchTaskOptions

    def __init__(self, resolved: ResolvedModel, model_path: str, options: Any, gpu_idx: list[int] | None):
        self.resolved = resolved
        self.model_path = model_path
        self.options = options
        self.gpu_idx = gpu_idx
        self.max_concurrency: int = options.max_concurrency
        self.ops: frozenset[str] = frozenset()
        self.device = "cpu"
        self.dtype = "float32"

    @classmethod
    def build(cls, resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
              gpu_idx: list[int] | None = None) -> Self:
        """Build (not load) the engine; unknown options, or a device that contradicts ``gpu_idx``, are a 400."""
        options = cls.options_class.from_kwargs(cls.engine, kwargs)
        gpu_idx = normalize_gpu_idx(gpu_idx)
        check_device(options.device, gpu_idx, cls.engine)  # now, not at load: a launch error is a 400
        return cls(resolved, model_path, options, gpu_idx)

    def place(self, family_dtype: str | None = None) -> Any:
        """Choose the device and dtype (at load: it imports torch); returns the torch dtype."""
        self.device = pick_device(self.options.device, self.gpu_idx, self.engine)
        self.dtype = dtype_name(self.options.dtype, self.device, family_dtype)
        return torch_dtype(self.dtype)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.engine, "device": self.device, "dtype": self.dtype, "ops": sorted(self.ops)}
