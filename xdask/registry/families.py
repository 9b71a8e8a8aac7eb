"""The catalog of model families: built-in JSON files, looked up by name.

Lookups are pure functions of the catalog, so the server validates a launch
(and answers 400 for an unknown family) before any worker is touched.
"""

from __future__ import annotations

import functools
import json
import pathlib

from xdask.errors import InvalidRequestError
from xdask.registry.specs import LLMFamily, ModelSpec, ResolvedModel

_BUILTIN_DIR = pathlib.Path(__file__).with_name("builtin")

MODEL_TYPES = ("LLM",)


@functools.lru_cache(maxsize=1)
def builtin_llm_families() -> dict[str, LLMFamily]:
    """Built-in LLM families by ``model_name``, read once from the package."""
    with (_BUILTIN_DIR / "llm_families.json").open(encoding="utf-8") as f:
        raw = json.load(f)
    families = [LLMFamily.model_validate(item) for item in raw]
    return {fam.model_name: fam for fam in families}


def list_families(model_type: str) -> list[LLMFamily]:
    """Every registered family of a model type (``LLM`` for now)."""
    if model_type.upper() != "LLM" and model_type != "LLM":
        raise InvalidRequestError(
            f"Unknown model type {model_type!r}; known types: {', '.join(MODEL_TYPES)}",
            param="model_type",
        )
    return list(builtin_llm_families().values())


def get_family(model_name: str) -> LLMFamily:
    """The family called ``model_name``; 400 when there is none."""
    family = builtin_llm_families().get(model_name)
    if family is None:
        known = ", ".join(sorted(builtin_llm_families()))
        raise InvalidRequestError(
            f"Model family {model_name!r} is not registered (known LLM families: {known})",
            param="model_name",
            code="model_not_registered",
        )
    return family


def resolve(
    model_name: str,
    model_format: str | None = None,
    model_size_in_billions: float | str | None = None,
    quantization: str | None = None,
) -> ResolvedModel:
    """Narrow a family to the spec and quantization that a launch asked for.

    Any argument left out matches the first spec that fits, as in Xinference.
    """
    family = get_family(model_name)
    candidates: list[ModelSpec] = [
        spec
        for spec in family.model_specs
        if (model_format is None or spec.model_format == model_format)
        and spec.size_matches(model_size_in_billions)
        and (quantization is None or quantization in spec.quantizations)
    ]
    if not candidates:
        offered = "; ".join(
            f"format={s.model_format} size={s.model_size_in_billions} quantizations={s.quantizations}"
            for s in family.model_specs
        )
        raise InvalidRequestError(
            f"No spec of {model_name!r} matches format={model_format} "
            f"size={model_size_in_billions} quantization={quantization}; it offers: {offered}",
            param="model_format",
        )
    spec = candidates[0]
    return ResolvedModel(family=family, spec=spec, quantization=quantization or spec.quantizations[0])
