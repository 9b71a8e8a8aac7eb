"""The model-management requests (launch, register) and the answer that describes a running model.

``LaunchModelRequest`` is the one list of launch fields: the HTTP API
validates ``POST /v1/models`` with it, and the CLI, the Python client and the
Jupyter launcher build it before they send anything, so a bad value fails
the same way everywhere. Fields it does not declare are the engine's options.

Examples
--------
>>> req = LaunchModelRequest.model_validate({"model_name": "gemma-3-270m", "replica": 2, "n_ctx": 4096})
>>> req.replica, req.engine_kwargs()
(2, {'n_ctx': 4096})
>>> req.to_body()
{'model_name': 'gemma-3-270m', 'replica': 2, 'n_ctx': 4096}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xdask.api.base import MAX_MODEL_NAME
from xdask.registry.families import type_fact_names


class LaunchModelRequest(BaseModel):
    """``POST /v1/models``: Xinference's launch payload; extras go to the engine."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())
    model_name: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
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
    request_limits: int | None = Field(default=None, ge=1, strict=True)
    #: Let explicit gpu_idx share GPUs already booked by other models.
    allow_shared_gpu: bool = False
    #: Weights already on the worker (a GGUF file or a model folder): nothing is downloaded.
    model_path: str | None = None
    #: The hub to download from (default: XDASK_MODEL_SRC, i.e. ``xdask.model-src``).
    download_hub: Literal["huggingface", "modelscope"] | None = None

    # Xinference's launch fields that xdask accepts and does not use (never passed to an engine).
    n_worker: int | None = None
    peft_model_config: dict[str, Any] | None = None
    replica_config: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    enable_virtual_env: bool | None = None
    virtual_env_packages: list[str] | None = None
    virtual_env_find_links: list[str] | None = None
    envs: dict[str, str] | None = None
    model_hub: str | None = None

    def engine_kwargs(self) -> dict[str, Any]:
        """The fields this schema does not declare (the engine's options), less the ``None`` ones."""
        return {k: v for k, v in (self.model_extra or {}).items() if v is not None}

    def to_body(self) -> dict[str, Any]:
        """The JSON body of ``POST /v1/models``: the fields that were given (defaults are the server's)."""
        return {**self.model_dump(exclude_unset=True), **(self.model_extra or {})}


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


def _replica_view(rep: dict[str, Any]) -> dict[str, Any]:
    return {
        "replica_id": rep["replica_id"],
        "address": rep["address"],
        "gpu_idx": rep.get("gpu_idx") or [],
        "state": rep["state"],
        "since": rep.get("since"),
        "attempts": rep.get("attempts", 1),
        "error": rep.get("error"),
        "load": rep.get("load"),
        "engine": rep.get("engine"),
    }


def describe_model(record: dict[str, Any]) -> dict[str, Any]:
    """A running model in Xinference's ``describe_model`` shape (+ OpenAI ids, replicas, history)."""
    spec = record["spec"]
    replicas = record["replicas"]
    serving = [r for r in replicas if r["state"] == "ready"] or replicas
    return {
        "id": record["model_uid"],
        "object": "model",
        "created": int(record.get("created", 0)),
        "owned_by": "xdask",
        "model_type": spec["model_type"],
        "address": serving[0]["address"] if serving else None,
        "accelerators": [str(i) for r in replicas for i in (r.get("gpu_idx") or [])],
        "model_name": spec["model_name"],
        "model_lang": spec["model_lang"],
        "model_ability": spec["model_ability"],
        "model_description": spec["model_description"],
        "model_format": spec["model_format"],
        "model_size_in_billions": spec["model_size_in_billions"],
        "model_family": spec["model_family"],
        "quantization": spec["quantization"],
        "model_engine": spec["model_engine"],
        "model_hub": "huggingface",
        "revision": None,
        "context_length": spec["context_length"],
        "replica": len(replicas),
        "state": record["state"],
        "restart_on_failure": record.get("restart_on_failure", True),
        "request_limits": spec.get("request_limits"),
        "engine": serving[0].get("engine") if serving else None,
        "replicas": [_replica_view(r) for r in replicas],
        "history": record.get("history", []),
        # Type-specific facts: an embedding model's dimensions and max_tokens, a reranker's type, ...
        **{name: spec[name] for name in type_fact_names(spec["model_type"]) if name in spec},
    }
