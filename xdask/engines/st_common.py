"""What the sentence-transformers engines (embedding, rerank) share: launch options, device, batcher.

Both wrap a sentence-transformers model (``SentenceTransformer`` or
``CrossEncoder``) the same way: validated launch options, the device that
placement booked (``cuda:<i>`` picked explicitly, never through
``CUDA_VISIBLE_DEVICES``: other models share the worker process), torch's
dtype, and a ``DynamicBatcher`` sized from ``xdask.sentence-transformers``.

Examples
--------
>>> opts = SentenceTransformersOptions.from_kwargs("sentence_transformers", {"max_batch_size": 64})
>>> opts.max_batch_size, opts.device
(64, 'auto')
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Literal

from pydantic import Field

from xdask import config
from xdask.engines.batching import DynamicBatcher
from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.options import EngineOptions
from xdask.engines.torch_task import dtype_name, pick_device, release, torch_dtype
from xdask.engines.transformers.options import check_device
from xdask.errors import ModelLoadError, ModelNotReadyError
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

#: The engine's name in the matrix, launches and errors.
ENGINE = "sentence_transformers"


class SentenceTransformersOptions(EngineOptions):
    """Launch options of the sentence_transformers engine (unknown names are a 400)."""

    #: "auto": the GPU placement booked (``cuda:<i>``), CUDA when nothing was
    #: placed and torch sees a GPU, else the CPU; "cpu" forces the CPU.
    device: str = "auto"
    #: "auto": float16 on CUDA, float32 on the CPU (half-precision matmuls are slow on most CPUs).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    #: Texts (or pairs) one model call takes; 0: ``xdask.sentence-transformers.max-batch``.
    max_batch_size: int = Field(default=0, ge=0)
    #: Seconds the batcher waits for more calls; None: ``xdask.sentence-transformers.batch-wait``.
    batch_wait: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Texts per forward pass; 0: ``xdask.sentence-transformers.encode-batch-size`` (0: 32 CPU, 128 CUDA).
    encode_batch_size: int = Field(default=0, ge=0)
    #: Requests the replica accepts at once; 0: ``xdask.sentence-transformers.max-concurrency``.
    max_concurrency: int = Field(default=0, ge=0)
    #: CPU threads for torch (process-wide); 0: leave torch's default.
    n_threads: int = Field(default=0, ge=0)
    trust_remote_code: bool = False

    def check(self, gpu_idx: list[int] | None) -> None:
        """400 now (at launch) when ``device`` contradicts the booked GPUs."""
        check_device(self.device, gpu_idx, ENGINE)

    def setting(self, name: str, own: int) -> int:
        """``own`` when set (non-zero), else ``xdask.sentence-transformers.<name>``."""
        return own or int(config.get(f"sentence-transformers.{name}"))


def load_settings(opts: SentenceTransformersOptions, gpu_idx: list[int] | None) -> dict[str, Any]:
    """The device (``cpu``, ``cuda:<i>``), torch dtype and batching numbers a replica runs with (imports torch).

    Device and dtype follow the other torch task engines (``xdask.engines.torch_task``).
    """
    import torch

    if opts.n_threads:
        torch.set_num_threads(opts.n_threads)
    device = pick_device(opts.device, gpu_idx, ENGINE)
    cuda = device.startswith("cuda")
    encode_batch = opts.setting("encode-batch-size", opts.encode_batch_size) or (128 if cuda else 32)
    return {
        "device": device,
        "dtype": torch_dtype(dtype_name(opts.dtype, device)),
        "encode_batch_size": encode_batch,
        "max_batch": opts.setting("max-batch", opts.max_batch_size),
        "batch_wait": float(opts.batch_wait if opts.batch_wait is not None
                            else config.get("sentence-transformers.batch-wait")),
        "max_concurrency": opts.setting("max-concurrency", opts.max_concurrency),
    }


class SentenceTransformersEngine:
    """Shared life cycle of the embedding and rerank engines: load, batcher, token counter, describe, close.

    Subclasses set ``ops`` and ``kind``, build the model in ``_build`` and
    score a batch in ``_run`` (called on the batching thread only, so the
    model never runs two batches at once). Token counts use a private copy of
    the tokenizer behind a lock: a fast tokenizer's truncation settings are
    state that the model's own tokenize call changes on the batching thread,
    and two threads touching it at once fail with "Already borrowed".
    """

    ops: frozenset[str] = frozenset()
    #: What the model is, for messages ("embedding model", "reranker").
    kind = "model"

    def __init__(self, resolved: ResolvedModel, model_path: str, options: SentenceTransformersOptions,
                 gpu_idx: list[int] | None):
        self.resolved = resolved
        self.family = resolved.family
        self.model_path = model_path
        self.options = options
        self.gpu_idx = gpu_idx
        self.max_concurrency = options.setting("max-concurrency", options.max_concurrency)
        self.settings: dict[str, Any] = {}
        self.model: Any = None
        self.batcher: DynamicBatcher[Any, Any] | None = None
        self._counter: Any = None
        self._count_lock = threading.Lock()

    def load(self) -> None:
        """Load the model on its device and start the batching thread."""
        try:
            import sentence_transformers  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(f"sentence-transformers is not installed here: pip install 'xdask[embedding]' "
                                 f"({exc})") from exc
        self.settings = load_settings(self.options, self.gpu_idx)
        try:
            self.model = self._build()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"sentence-transformers could not load {self.model_path} as a {self.kind}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if self.settings["dtype"] != next(self.model.parameters()).dtype:
            self.model.to(self.settings["dtype"])
        self.model.eval()
        tokenizer = getattr(self.model, "tokenizer", None)
        self._counter = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.batcher = DynamicBatcher(self._run, max_items=self.settings["max_batch"],
                                      wait=self.settings["batch_wait"], name=self.family.model_name)

    def _build(self) -> Any:
        raise NotImplementedError

    def _run(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def count_tokens(self, first: list[str], second: list[str] | None = None,
                     max_length: int | None = None) -> list[int]:
        """Tokens the model reads for each text (or text pair), special tokens included.

        ``max_length`` truncates as the model does (pairs: longest first);
        None counts the whole text. Without a tokenizer (unusual models), 0s.
        """
        if self._counter is None:
            return [0] * len(first)
        kwargs: dict[str, Any] = {"truncation": "longest_first", "max_length": max_length} if max_length else {
            "truncation": False}
        with self._count_lock:
            ids = self._counter(first, second, add_special_tokens=True, padding=False, return_attention_mask=False,
                                return_token_type_ids=False, verbose=False, **kwargs)["input_ids"]
        return [len(row) for row in ids]

    def describe(self) -> dict[str, Any]:
        """Engine facts for ``GET /v1/models/{uid}`` (device, dtype, batching counters)."""
        return {
            "backend": ENGINE,
            "device": self.settings.get("device"),
            "dtype": str(self.settings.get("dtype", "")).replace("torch.", "") or None,
            "gpu_idx": self.gpu_idx,
            "encode_batch_size": self.settings.get("encode_batch_size"),
            **(self.batcher.stats() if self.batcher is not None else {}),
        }

    def close(self) -> None:
        """Stop the batcher and drop the model (its CUDA memory goes back to the driver)."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        self.model = None
        self._counter = None
        release(self.settings.get("device", "cpu"))

    def _require_loaded(self) -> DynamicBatcher[Any, Any]:
        if self.batcher is None:
            raise ModelNotReadyError(f"{self.family.model_name} is not loaded")
        return self.batcher


def make_options(kwargs: dict[str, Any], gpu_idx: list[int] | None) -> tuple[SentenceTransformersOptions,
                                                                            list[int] | None]:
    """Validated launch options and GPU indices (400 now, at launch, for bad ones)."""
    options = SentenceTransformersOptions.from_kwargs(ENGINE, kwargs)
    gpu_idx = normalize_gpu_idx(gpu_idx)
    options.check(gpu_idx)
    return options, gpu_idx
