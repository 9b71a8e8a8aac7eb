"""Metadata of a GGUF file (chat template, BOS rules) without loading the model.

Engines need two facts the weights loader may drop: the chat template
(``tokenizer.chat_template``) and whether prompts start with BOS
(``tokenizer.ggml.add_bos_token``; transformers' GGUF tokenizer conversion
loses it, and Gemma without BOS writes noticeably worse text). Uses the
``gguf`` package when installed (it memory-maps the file); without it,
or for a file without the keys, the answer is None.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def read_gguf_metadata(path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` present in the GGUF file's metadata."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return {}
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - a damaged file fails later, in the engine, with its own error
        logger.debug("could not read GGUF metadata of %s: %s", path, exc)
        return {}
    found = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            found[key] = field.contents()
    return found


def gguf_chat_template(path: str) -> str | None:
    """``tokenizer.chat_template`` of a GGUF file, if it has one."""
    value = read_gguf_metadata(path, ("tokenizer.chat_template",)).get("tokenizer.chat_template")
    return value if isinstance(value, str) and value else None


def gguf_adds_bos(path: str) -> bool | None:
    """Whether the model's prompts start with BOS (``tokenizer.ggml.add_bos_token``)."""
    value = read_gguf_metadata(path, ("tokenizer.ggml.add_bos_token",)).get("tokenizer.ggml.add_bos_token")
    return None if value is None else bool(value)
