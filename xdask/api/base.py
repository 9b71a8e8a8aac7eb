"""What every xdask request schema shares: the pydantic configs, the error helper, and the 400 of a bad body.

JSON bodies are strict (``"5"`` is not a number) and NaN/Infinity are
refused, so a malformed request fails here with a precise message instead of
deep in an engine. Unknown fields are ignored, as OpenAI-compatible servers
do, so clients that send vendor extras (Xinference's client does) keep
working. Multipart forms carry every value as text, so their schemas convert.

Examples
--------
>>> from pydantic import BaseModel, Field, ValidationError
>>> class Body(BaseModel):
...     model_config = STRICT
...     n: int = Field(ge=1)
>>> try:
...     Body.model_validate_json('{"n": "5"}')
... except ValidationError as exc:
...     print(validation_error(exc).message)
n: Input should be a valid integer
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from xdask.errors import InvalidRequestError

#: JSON request bodies: strict numbers, no NaN/Infinity, unknown fields ignored.
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", protected_namespaces=())

#: Multipart form fields: every value is text, so numbers convert ("2" is 2).
FORM = ConfigDict(strict=False, allow_inf_nan=False, extra="ignore", protected_namespaces=())

#: Largest ``model`` name a request may give.
MAX_MODEL_NAME = 256


def invalid(message: str) -> PydanticCustomError:
    """A validation error whose message reads as is (no "Value error," prefix)."""
    return PydanticCustomError("invalid_value", message)


def validation_error(exc: ValidationError) -> InvalidRequestError:
    """A pydantic error as the 400 the API answers: one line, and the offending parameter."""
    errors = exc.errors(include_url=False, include_context=False)
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("function-after",))
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"Request body is not valid JSON: {msg}")
    if first.get("type") == "model_type":
        return InvalidRequestError("Request body must be a JSON object")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return InvalidRequestError(f"{loc}: {msg}{more}" if loc else f"{msg}{more}", param=loc.split(".")[0] or None)
