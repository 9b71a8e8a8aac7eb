"""OpenAI response bodies of whole (non-streamed) answers.

One builder for the HTTP server, the OpenAI Batch API's output lines and
the Python batch futures, so an answer has the same shape wherever it is
read.

Examples
--------
>>> body = chat_completion("m", "Hi!", "stop", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
>>> body["object"], body["choices"][0]["message"]["content"]
('chat.completion', 'Hi!')
"""

from __future__ import annotations

import time
import uuid
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(model: str, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason or "stop",
            "logprobs": None,
        }],
        "usage": usage,
    }


def text_completion(model: str, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
    """A ``text_completion`` object with one choice."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason or "stop", "logprobs": None}],
        "usage": usage,
    }
