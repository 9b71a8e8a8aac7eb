"""Metadata of a GGUF file (chat template, BOS rules) without loading the model.

Engines need two facts the weights loader may drop: the chat template
(``tokenizer.chat_template``) and whether prompts start with BOS
(``tokenizer.ggml.add_bos_token``; transformers' GGUF tokenizer conversion
loses it, and Gemma without BOS writes noticeably worse text).

Why our own reader: ``gguf.GGUFReader`` parses every field, including the
262,144-entry token list of a Gemma vocabulary, which took 18 s here per
engine built. This reads the key/value header sequentially from a memory
map, skipping arrays by their sizes, and stops once it has what was asked.
"""

from __future__ import annotations

import logging
import mmap
import struct
from typing import Any

logger = logging.getLogger(__name__)

# GGUF value types: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, buf: Any):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, vtype: int, want: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            if want:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            itype, count = self.unpack("I"), self.unpack("Q")
            if itype in _SCALARS and not want:
                self.pos += count * struct.calcsize("<" + _SCALARS[itype])
                return None
            items = [self.value(itype, want) for _ in range(count)]
            return items if want else None
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` present in the GGUF file's metadata ({} if unreadable)."""
    wanted = set(keys)
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf)
            if bytes(buf[:4]) != b"GGUF":
                return {}
            r.pos = 4
            version = r.unpack("I")
            if version < 2:
                return {}
            r.unpack("Q")  # tensor count
            for _ in range(r.unpack("Q")):
                key = r.string()
                vtype = r.unpack("I")
                value = r.value(vtype, key in wanted)
                if key in wanted:
                    found[key] = value
                    if len(found) == len(wanted):
                        break
    except (OSError, ValueError, struct.error) as exc:  # a damaged file fails later, in the engine
        logger.debug("could not read GGUF metadata of %s: %s", path, exc)
    return found


def gguf_chat_template(path: str) -> str | None:
    """``tokenizer.chat_template`` of a GGUF file, if it has one."""
    value = read_gguf_metadata(path, ("tokenizer.chat_template",)).get("tokenizer.chat_template")
    return value if isinstance(value, str) and value else None


def gguf_adds_bos(path: str) -> bool | None:
    """Whether the model's prompts start with BOS (``tokenizer.ggml.add_bos_token``)."""
    value = read_gguf_metadata(path, ("tokenizer.ggml.add_bos_token",)).get("tokenizer.ggml.add_bos_token")
    return None if value is None else bool(value)
