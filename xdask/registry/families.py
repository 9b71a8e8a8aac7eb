"""The catalog of model families: built-in JSON files plus custom registrations.

Lookups are pure functions of the catalog, so the server validates a launch
(and answers 400 for an unknown family) before any worker is touched. Custom
families (``xdask.registry.custom``) are read at lookup time, so a server
restarted on the same ``XDASK_HOME`` sees the persisted ones.

Examples
--------
>>> from xdask.registry import list_families, resolve
>>> len(list_families("LLM")) >= 40
True
>>> resolve("gemma-3-270m").quantization
'Q4_K_M'
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import pydantic

from xdask.errors import InvalidRequestError
from xdask.registry.specs import (
    FAMILY_CLASSES,
    AnyFamily,
    LLMFamily,
    ModelSpec,
    ResolvedModel,
)

_BUILTIN_DIR = pathlib.Path(__file__).with_name("builtin")

#: Every model type the catalog knows, in Xinference's spelling.
MODEL_TYPES = ("LLM", "embedding", "rerank", "image", "audio")

#: The built-in file of each model type.
BUILTIN_FILES = {model_type: f"{model_type.lower()}_families.json" for model_type in MODEL_TYPES}


def normalize_model_type(model_type: str) -> str:
    """``llm``/``Embedding`` → the canonical spelling; 400 for an unknown type."""
    for known in MODEL_TYPES:
        if model_type.lower() == known.lower():
            return known
    raise InvalidRequestError(
        f"Unknown model type {model_type!r}; known types: {', '.join(MODEL_TYPES)}",
        param="model_type",
    )


def load_family_file(path: pathlib.Path, model_type: str) -> list[AnyFamily]:
    """Validate one family file (a JSON list) against its type's schema.

    Raises ``ValueError`` naming the file, the family and pydantic's message
    (``TypeError`` if the file is not a list).
    """
    cls = FAMILY_CLASSES[model_type]
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        raise TypeError(f"{path.name}: expected a JSON list of families")
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(cls.model_validate(item))
        except pydantic.ValidationError as exc:
            name = item.get("model_name", f"#{i}") if isinstance(item, dict) else f"#{i}"
            raise ValueError(f"{path.name}: family {name}: {exc}") from exc
    return out


def check_unique_names(families: Iterable[AnyFamily]) -> None:
    """``model_name`` is unique across all types: launches and caches key on it alone."""
    seen: dict[str, str] = {}
    for fam in families:
        if fam.model_name in seen:
            raise ValueError(
                f"model_name {fam.model_name!r} is used twice ({seen[fam.model_name]} and {fam.model_type})"
            )
        seen[fam.model_name] = fam.model_type


@functools.lru_cache(maxsize=1)
def builtin_catalog() -> dict[str, dict[str, AnyFamily]]:
    """Every built-in family, by type then name, read once from the package."""
    catalog = {
        model_type: {fam.model_name: fam for fam in load_family_file(_BUILTIN_DIR / file, model_type)}
        for model_type, file in BUILTIN_FILES.items()
    }
    check_unique_names(f for fams in catalog.values() for f in fams.values())
    return catalog


def builtin_families(model_type: str) -> dict[str, AnyFamily]:
    """Built-in families of one type by ``model_name``."""
    return builtin_catalog()[normalize_model_type(model_type)]


def builtin_llm_families() -> dict[str, LLMFamily]:
    """Built-in LLM families by ``model_name``."""
    return builtin_families("LLM")  # type: ignore[return-value]


def builtin_type_of(model_name: str) -> str | None:
    """The type of the built-in family called ``model_name``, if there is one."""
    for model_type, fams in builtin_catalog().items():
        if model_name in fams:
            return model_type
    return None


def list_families(model_type: str) -> list[AnyFamily]:
    """Every registered family of a model type: built-in first, then custom ones."""
    from xdask.registry.custom import custom_families

    model_type = normalize_model_type(model_type)
    return [*builtin_families(model_type).values(), *custom_families(model_type).values()]


def get_family(model_name: str, model_type: str = "LLM") -> AnyFamily:
    """The family called ``model_name`` (built-in or custom); 400 when there is none."""
    from xdask.registry.custom import custom_families

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
    from xdask.registry.custom import custom_families

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
