"""Chat and completion requests (OpenAI's shapes), their whole answers, their stream chunks, and ``fold_stream``.

The HTTP server, the OpenAI Batch API (each line of a batch file) and the
Python client's batch helpers validate the same requests with these schemas,
and build the same answers: a non-streamed answer is the fold of the chunks a
streamed one would send (``fold_stream``), so the two can never disagree.

Examples
--------
>>> req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
>>> builder = ChunkBuilder("chat", "m", include_usage=True)
>>> chunks = [builder.first(), builder.text("Hel"), builder.text("lo!"), builder.last("stop"),
...           builder.usage_chunk(3, 2)]
>>> body = fold_stream(chunks)
>>> body["object"], body["choices"][0]["message"]["content"], body["usage"]["total_tokens"]
('chat.completion', 'Hello!', 5)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterable, Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from xdask.api.base import MAX_MODEL_NAME, STRICT
from xdask.api.wire import GenerationRequest
from xdask.errors import InvalidRequestError

_COMMON = STRICT

#: At most this many stop sequences (OpenAI allows 4; engines handle more).
MAX_STOP = 16


class StreamOptions(BaseModel):
    model_config = _COMMON
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = _COMMON
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content is text or a list of text parts."""

    model_config = _COMMON
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            return {"role": role, "content": [p.model_dump() for p in self.content]}
        return {"role": role, "content": self.content or ""}


class SamplingFields(BaseModel):
    """Fields shared by chat and completion requests."""

    model_config = _COMMON
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def sampling_params(self, max_tokens: int) -> dict[str, Any]:
        """The engine-side params (``xdask.engines.SamplingParams`` fields)."""
        params: dict[str, Any] = {"max_tokens": max_tokens}
        for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            if value is not None:
                params[key] = value
        if self.stop:
            params["stop"] = list(self.stop)
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (one text prompt)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt must be a string or a list of exactly one string")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def resolve_max_tokens(requested: int | None, context_length: int) -> int:
    """The ``max_tokens`` a request runs with: the default (capped by the context) or the requested one.

    More than the model's context is a 400 ``context_length_exceeded``.
    """
    from xdask import config

    if requested is None:
        return min(int(config.get("generate.default-max-tokens")), context_length)
    if requested > context_length:
        raise InvalidRequestError(
            f"max_tokens={requested} is more than the model's context length ({context_length})",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def internal_request(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> GenerationRequest:
    """The plain dict a model actor takes (``xdask.cluster.generation``) for a validated request."""
    if isinstance(req, ChatCompletionRequest):
        return {
            "kind": "chat",
            "stream": req.stream,
            "messages": [m.as_template_input() for m in req.messages],
            "chat_template_kwargs": req.chat_template_kwargs or {},
            "params": req.sampling_params(max_tokens),
        }
    return {"kind": "completion", "stream": req.stream, "prompt": req.prompt_text,
            "params": req.sampling_params(max_tokens)}


# -- answers ---------------------------------------------------------------------

#: The two kinds of generation request and their OpenAI object names.
Kind = Literal["chat", "completion"]


def request_kind(req: ChatCompletionRequest | CompletionRequest) -> Kind:
    """``chat`` or ``completion``: which endpoint's shapes a request answers in."""
    return "chat" if isinstance(req, ChatCompletionRequest) else "completion"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChunkBuilder:
    """The OpenAI stream chunks of one answer (``chat.completion.chunk`` or ``text_completion``).

    One id and ``created`` for every chunk of the answer. With
    ``include_usage`` every chunk carries ``"usage": null`` and the last one
    the counts, as OpenAI sends them for ``stream_options.include_usage``.
    """

    def __init__(self, kind: Kind, model: str, include_usage: bool = False):
        self.chat = kind == "chat"
        self.include_usage = include_usage
        self.base = {
            "id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self.base, "choices": [choice], **self._extra}

    def first(self) -> dict[str, Any] | None:
        """The chunk that opens a chat answer (the assistant's role); None for a completion."""
        return self._choice("", None, first=True) if self.chat else None

    def text(self, text: str) -> dict[str, Any]:
        """A chunk of generated text."""
        return self._choice(text, None)

    def last(self, finish_reason: str | None) -> dict[str, Any]:
        """The chunk that closes the choice with its ``finish_reason`` (``stop`` when the engine gave none)."""
        return self._choice(None if self.chat else "", finish_reason or "stop")

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The closing chunk of ``include_usage``: no choices, the counts."""
        return {**self.base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def _fold_choice(into: dict[str, Any], choice: dict[str, Any]) -> None:
    """Add one chunk's choice to the whole choice being built (text, tool-call pieces, logprobs, finish)."""
    if choice.get("finish_reason") is not None:
        into["finish_reason"] = choice["finish_reason"]
    if choice.get("logprobs"):
        mine = into.get("logprobs") or {}
        for key, value in choice["logprobs"].items():
            if isinstance(value, list):
                mine.setdefault(key, []).extend(value)
            else:
                mine[key] = value
        into["logprobs"] = mine
    if "text" in choice:
        into["text"] = into.get("text", "") + (choice["text"] or "")
        return
    delta = choice.get("delta") or {}
    message = into.setdefault("message", {"role": "assistant", "content": None})
    if delta.get("role"):
        message["role"] = delta["role"]
    for key in ("content", "reasoning_content"):
        if delta.get(key) is not None:
            message[key] = (message.get(key) or "") + delta[key]
    for call in delta.get("tool_calls") or ():
        calls = message.setdefault("tool_calls", [])
        while len(calls) <= int(call.get("index", 0)):
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        whole = calls[int(call.get("index", 0))]
        if call.get("id"):
            whole["id"] = call["id"]
        if call.get("type"):
            whole["type"] = call["type"]
        function = call.get("function") or {}
        for key in ("name", "arguments"):
            if function.get(key):
                whole["function"][key] += function[key]


def fold_stream(chunks: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """The whole answer (``chat.completion`` or ``text_completion``) that a stream of chunks adds up to.

    Choices are kept by ``index``; text, reasoning and tool-call arguments
    are joined, logprobs lists concatenated, the last ``finish_reason`` and
    ``usage`` win. A chat choice whose content stayed empty and that made no
    tool call answers ``content: ""`` (what OpenAI sends for an empty reply).
    """
    whole: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if chunk is None:
            continue
        if whole is None:
            chat = chunk.get("object") == "chat.completion.chunk"
            whole = {"id": chunk["id"], "object": "chat.completion" if chat else "text_completion",
                     "created": chunk["created"], "model": chunk["model"], "choices": [], "usage": None}
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            into = choices.setdefault(index, {"index": index, "finish_reason": None, "logprobs": None})
            _fold_choice(into, choice)
        if chunk.get("usage"):
            whole["usage"] = chunk["usage"]
    if whole is None:
        raise ValueError("fold_stream needs at least one chunk")
    for choice in choices.values():
        message = choice.get("message")
        if message is not None and message.get("content") is None and not message.get("tool_calls"):
            message["content"] = ""
        for key in ("message", "text", "finish_reason", "logprobs"):  # OpenAI's key order
            if key in choice:
                choice[key] = choice.pop(key)
    whole["choices"] = [choices[i] for i in sorted(choices)]
    return whole


async def afold_stream(chunks: AsyncIterable[dict[str, Any] | None]) -> dict[str, Any]:
    """``fold_stream`` over an async stream of chunks."""
    return fold_stream([chunk async for chunk in chunks])
