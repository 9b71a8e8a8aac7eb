"""Pydantic schemas of the OpenAI requests (chat, completion, embeddings) and of rerank.

They live in the core package because three places validate the same
request: the HTTP server, the OpenAI Batch API (each line of a batch file)
and the Python client's batch helpers (before anything is submitted).

Numbers are strict (``"5"`` is not a number) and NaN/Infinity are refused,
so malformed requests fail here with a precise message instead of deep in
an engine. Unknown fields are ignored, as OpenAI-compatible servers do, so
clients that send vendor extras (Xinference's client does) keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from xdask.errors import InvalidRequestError

_COMMON = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", protected_namespaces=())

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
    model: str = Field(min_length=1, max_length=256)
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


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message reads as is (no "Value error," prefix)."""
    return PydanticCustomError("invalid_value", message)


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` in OpenAI's shape; ``input`` comes out as a list of strings.

    OpenAI also takes token ids (a list of integers, or of such lists); xdask
    embeds text only, and says so. Empty strings are refused as OpenAI does;
    ``xdask.embedding.max-inputs`` caps the list.
    """

    model_config = _COMMON
    model: str = Field(min_length=1, max_length=256)
    input: list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> list[str]:
        from xdask import config

        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise _invalid("must be a string or a list of strings")
        if not texts:
            raise _invalid("must not be an empty list")
        limit = int(config.get("embedding.max-inputs"))
        if len(texts) > limit:
            raise _invalid(f"holds {len(texts)} items; at most {limit} per request")
        for i, text in enumerate(texts):
            if isinstance(text, str):
                if not text:
                    raise _invalid(f"item {i} is an empty string (there is nothing to embed)")
                continue
            if isinstance(text, int | list) and not isinstance(text, bool):
                raise _invalid("token-id input (integers, or lists of integers) is not supported: send text")
            raise _invalid(f"item {i} must be a string, not {type(text).__name__}")
        return texts

    def payload(self) -> dict[str, Any]:
        """The ``embed`` op's payload (``xdask.engines.embedding``)."""
        return {"input": self.input, "dimensions": self.dimensions}


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` in Xinference's (Cohere's) shape.

    ``documents`` are strings or ``{"text": ...}`` objects; ``top_n`` above
    the number of documents returns them all; ``max_chunks_per_doc`` and
    ``return_len`` are accepted and ignored (long documents are truncated,
    and token counts are always reported).
    """

    model_config = _COMMON
    model: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1)
    documents: list[str]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool | None = None
    return_len: bool | None = None
    max_chunks_per_doc: int | None = Field(default=None, ge=1)

    @field_validator("documents", mode="before")
    @classmethod
    def _check_documents(cls, value: Any) -> list[str]:
        from xdask import config

        if not isinstance(value, list):
            raise _invalid("must be a list of strings or of {\"text\": ...} objects")
        if not value:
            raise _invalid("must not be empty")
        limit = int(config.get("rerank.max-documents"))
        if len(value) > limit:
            raise _invalid(f"holds {len(value)} items; at most {limit} per request")
        texts = []
        for i, doc in enumerate(value):
            if isinstance(doc, dict) and isinstance(doc.get("text"), str):
                doc = doc["text"]
            if not isinstance(doc, str):
                raise _invalid(f"item {i} must be a string or an object with a string \"text\"")
            texts.append(doc)
        return texts

    def payload(self) -> dict[str, Any]:
        """The ``rerank`` op's payload (``xdask.engines.rerank``)."""
        return {"query": self.query, "documents": self.documents}


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


def internal_request(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> dict[str, Any]:
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


def validation_error(exc: ValidationError) -> InvalidRequestError:
    """A pydantic error as the 400 the API answers: one line, and the offending parameter."""
    errors = exc.errors(include_url=False, include_context=False)
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("function-after",))
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"Request body is not valid JSON: {msg}")
    if first.get("type") == "model_type":
        return InvalidRequestError("Request body must be a JSON object")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return InvalidRequestError(f"{loc}: {msg}{more}" if loc else f"{msg}{more}", param=loc.split(".")[0] or None)
