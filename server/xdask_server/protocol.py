"""Pydantic schemas of the HTTP API (no Tornado here).

The generation requests (chat, completion) are in ``xdask.protocol``, shared
with the batch runner; this module adds the management requests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xdask.protocol import (  # noqa: F401  (re-exported: the server's handlers import them from here)
    MAX_STOP,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    StreamOptions,
    TextPart,
)


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
    #: Concurrent requests the model admits at each server; more get 429 rate_limit_exceeded (None: no limit).
    request_limits: int | None = Field(default=None, ge=1)
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
