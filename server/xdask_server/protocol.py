"""Pydantic schemas of the HTTP API (no Tornado here).

Numbers are strict (``"5"`` is not a number) and NaN/Infinity are refused,
so malformed requests fail here with a precise message instead of deep in
an engine. Unknown fields are ignored, as OpenAI-compatible servers do, so
clients that send vendor extras (Xinference's client does) keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class LaunchModelRequest(BaseModel):
    """``POST /v1/models``: Xinference's launch payload; extras go to the engine."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())
    model_name: str = Field(min_length=1, max_length=256)
    model_uid: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    model_type: str = "LLM"
    model_engine: str | None = None
    model_format: str | None = None
    model_size_in_billions: int | float | str | None = None
    quantization: str | None = None
    replica: int = Field(default=1, ge=1, le=1024)
    #: GPUs per replica: a count, "auto" (one if a worker has one free, else the CPU), or 0/null for CPU only.
    n_gpu: int | str | None = "auto"
    #: Explicit GPU indices on the chosen worker.
    gpu_idx: int | list[int] | None = None
    #: Pin to the workers of one host, or to one worker address.
    worker_ip: str | None = Field(default=None, max_length=256)
    worker_address: str | None = Field(default=None, max_length=256)
    #: Relaunch replicas lost with a dead worker (default: xdask.cluster.restart-on-failure).
    restart_on_failure: bool | None = None
    #: Let explicit gpu_idx share GPUs already booked by other models.
    allow_shared_gpu: bool = False
    #: Weights already on the worker (a GGUF file or a model folder): nothing is downloaded.
    model_path: str | None = None
    #: The hub to download from (default: XDASK_MODEL_SRC, i.e. ``xdask.model-src``).
    download_hub: Literal["huggingface", "modelscope"] | None = None

    def to_launch_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        data.update(self.model_extra or {})
        return data


class RegisterModelRequest(BaseModel):
    """``POST /v1/model_registrations/{model_type}``: a custom family, as Xinference's client sends it.

    ``model`` is the family spec as a JSON string (Xinference's shape) or an
    object; ``worker_ip`` is accepted and ignored: the server resolves every
    launch, so a registration serves the whole cluster.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | dict[str, Any]
    persist: bool = False
    worker_ip: str | None = None
