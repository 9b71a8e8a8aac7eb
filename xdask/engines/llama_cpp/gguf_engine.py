"""``GGUFEngineBase``: what the two llama.cpp backends have in common."""

from __future__ import annotations

from typing import Any, ClassVar

from xdask.engines.gguf_meta import gguf_chat_template
from xdask.engines.llama_cpp.options import LlamaCppOptions


class GGUFEngineBase:
    """What both llama.cpp backends share: the file, the options, ``describe``."""

    name: ClassVar[str] = "llama.cpp"
    backend: ClassVar[str]
    #: llama.cpp adds BOS when it tokenizes a prompt.
    adds_bos = True
    special_tokens: dict[str, str] = {}

    def __init__(self, model_path: str, options: LlamaCppOptions, max_concurrency: int):
        self.model_path = model_path
        self.options = options
        self.max_concurrency = max_concurrency
        self.chat_template = gguf_chat_template(model_path)

    def describe(self) -> dict[str, Any]:
        split = self.options.split
        return {
            "engine": self.name,
            "backend": self.backend,
            "n_ctx": self.options.n_ctx,
            "n_parallel": self.options.n_parallel,
            "n_threads": self.options.n_threads,
            "n_gpu_layers": self.options.offload_layers,
            "split_mode": split.split_mode if split else None,
            "gpu_idx": None if self.options.gpu_idx is None else list(self.options.gpu_idx),
        }
