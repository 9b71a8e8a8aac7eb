"""Token ids to text for engines that sample in Python (transformers, MLX).

Two small pieces every such engine needs and gets wrong in the same ways:

* ``IncrementalDetokenizer``: byte-level BPE tokens may end inside a UTF-8
  character; decoding each token alone prints U+FFFD. It decodes a sliding
  window and only releases text once it is complete (vLLM's and TGI's
  method), in O(1) tokens per step.
* ``StopMatcher``: OpenAI ``stop`` strings end the answer and are not part of
  it; text that might be the start of a stop string is held back until it
  is known not to be one.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens whose text has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end)."""
        if self._read >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Cuts generated text at the first OpenAI ``stop`` string.

    ``push`` returns the text safe to emit now and whether a stop string was
    hit (then generation must end and nothing after it is emitted).
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self._held = ""
        self._longest = max((len(s) for s in self.stop), default=0)

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stop:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        # Hold back the longest tail that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._longest - 1, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stop):
                keep = n
                break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Held text at the end of generation (it was not a stop string)."""
        held, self._held = self._held, ""
        return held
