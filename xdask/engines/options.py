"""``EngineOptions``: launch kwargs an engine accepts, validated with pydantic.

Why: engine-specific options pass straight through from a launch
(``--gpu_memory_utilization 0.9``, ``--n_ctx 4096``); a typo must be a 400
that names the options the engine accepts, not a silently ignored kwarg.
"""

from __future__ import annotations

from typing import Any, Self

import pydantic
from pydantic import BaseModel, ConfigDict

from xdask.errors import InvalidRequestError


class EngineOptions(BaseModel):
    """Base of each engine's options model (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    #: Engine name used in error messages.
    engine_name: str = pydantic.Field(default="engine", exclude=True, repr=False)

    @classmethod
    def from_kwargs(cls, engine: str, kwargs: dict[str, Any]) -> Self:
        """Validate launch kwargs; unknown or ill-typed ones are a 400 that lists the accepted names."""
        try:
            return cls.model_validate({**kwargs, "engine_name": engine})
        except pydantic.ValidationError as exc:
            accepted = sorted(n for n in cls.model_fields if n != "engine_name")
            problems = []
            for err in exc.errors(include_url=False, include_context=False):
                loc = ".".join(str(p) for p in err.get("loc", ()))
                if err.get("type") == "extra_forbidden":
                    problems.append(f"unknown option {loc!r}")
                else:
                    problems.append(f"{loc}: {err.get('msg')}")
            raise InvalidRequestError(
                f"Invalid {engine} options: {'; '.join(problems)}. Options {engine} accepts: {', '.join(accepted)}",
                param="engine_kwargs",
                code="invalid_engine_option",
            ) from exc
