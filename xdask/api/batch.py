"""``POST /v1/batches``: the OpenAI Batch API's create request.

The endpoint and completion window are checked by the batch manager
(``xdask.batch.api``), so that their messages can list what is accepted.

Examples
--------
>>> CreateBatchRequest.model_validate({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
...                                    "completion_window": "24h"}).endpoint
'/v1/chat/completions'
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CreateBatchRequest(BaseModel):
    """``POST /v1/batches``; the endpoint and window are checked by the manager, for a precise message."""

    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())
    input_file_id: str = Field(min_length=1, max_length=256)
    endpoint: str = Field(min_length=1, max_length=256)
    completion_window: str
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        if any(len(k) > 64 for k in v) or any(len(x) > 512 for x in v.values()):
            raise ValueError("keys are at most 64 characters, values at most 512")
        return v
