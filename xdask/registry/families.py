"""Lookups over the catalog of model families: the built-in ones plus custom registrations.

This module composes ``builtins`` (the shipped JSON files) and ``custom``
(what users register); both sit below it. Lookups are pure functions of the
catalog, so the server validates a launch (and answers 400 for an unknown
family) before any worker is touched. Custom families are read at lookup
time, so a server restarted on the same ``XDASK_HOME`` sees the persisted ones.

Examples
--------
>>> from xdask.registry import list_families, resolve
>>> len(list_families("LLM")) >= 40
True
>>> resolve("gemma-3-270m").quantization
'Q4_K_M'
"""

from __future__ import annotations

from typing import Any

from xdask.errors import InvalidRequestError
from xdask.registry.builtins import MODEL_TYPES, builtin_families, builtin_type_of, normalize_model_type
from xdask.registry.custom import custom_families
from xdask.registry.specs import AnyFamily, ModelSpec, ResolvedModel


def list_families(model_type: str) -> list[AnyFamily]:
    """Every registered family of a model type: built-in first, then custom ones."""
    model_type = normalize_model_type(model_type)
    return [*builtin_families(model_type).values(), *custom_families(model_type).values()]


def get_family(model_name: str, model_type: str = "LLM") -> AnyFamily:
    """The family called ``model_name`` (built-in or custom); 400 when there is none."""
    model_type = normalize_model_type(model_type)
    family = builtin_families(model_type).get(model_name) or custom_families(model_type).get(model_name)
    if family is None:
        known = ", ".join(sorted(f.model_name for f in list_families(model_type)))
        raise InvalidRequestError(
            f"Model family {model_name!r} is not registered (known {model_type} families: {known})",
            param="model_name",
            code="model_not_registered",
        )
    return family


def find_family(model_name: str) -> AnyFamily:
    """The family called ``model_name`` of whatever type (names are unique across types); 400 if none.

    For callers that get a bare name (``GET /v1/engines/{model_name}``).
    """
    model_type = builtin_type_of(model_name)
    if model_type is None:
        model_type = next((t for t in MODEL_TYPES if model_name in custom_families(t)), "LLM")
    return get_family(model_name, model_type)


def resolve(
    model_name: str,
    model_format: str | None = None,
    model_size_in_billions: float | str | None = None,
    quantization: str | None = None,
    model_type: str = "LLM",
) -> ResolvedModel:
    """Narrow a family (of ``model_type``) to the spec and quantization that a launch asked for.

    Any argument left out matches the first spec that fits, as in Xinference.
    """
    family = get_family(model_name, model_type)
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


#: Fields of each non-LLM family that a running model reports (``GET /v1/models/{uid}``).
_TYPE_FACTS = {
    "embedding": ("dimensions", "max_tokens", "language", "matryoshka"),
    "rerank": ("type", "max_tokens", "language"),
    "image": ("default_generate_config",),
    "audio": ("multilingual",),
}


def type_fact_names(model_type: str) -> tuple[str, ...]:
    """The names of the type-specific fields a running model of ``model_type`` reports."""
    return _TYPE_FACTS.get(model_type, ())


def type_facts(family: AnyFamily) -> dict[str, Any]:
    """The type-specific fields of ``family`` (empty for an LLM)."""
    return {name: getattr(family, name) for name in type_fact_names(family.model_type)}
