"""``GGUFEngineBase``: what the two llama.cpp backends have in common."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from xdask.engines.llama_cpp.options import LlamaCppOptions

logger = logging.getLogger(__name__)


def read_gguf_chat_template(path: str) -> str | None:
    """``tokenizer.chat_template`` from a GGUF file's metadata, if it has one.

    Uses the ``gguf`` package when installed (it memory-maps the file); a
    model without the key, or a machine without the package, gives None and
    the family spec must carry the template.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        field = GGUFReader(path).get_field("tokenizer.chat_template")
    except Exception as exc:  # a damaged file fails later, in the backend, with its own error
        logger.debug("could not read GGUF metadata of %s: %s", path, exc)
        return None
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


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
        self.chat_template = read_gguf_chat_template(model_path)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "backend": self.backend,
            "n_ctx": self.options.n_ctx,
            "n_parallel": self.options.n_parallel,
            "n_threads": self.options.n_threads,
        }
