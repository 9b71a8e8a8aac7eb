"""The built-in catalog: the model types and the families shipped in ``builtin/``.

The lowest layer of the registry: both ``custom`` (a registration must not
take a built-in name) and ``families`` (lookups over built-in plus custom)
read it, and it reads neither, so the registry has no import circle.

Examples
--------
>>> normalize_model_type("llm")
'LLM'
>>> builtin_type_of("gemma-3-270m"), builtin_type_of("no-such-model") is None
('LLM', True)
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Iterable

import pydantic

from xdask.errors import InvalidRequestError
from xdask.registry.specs import FAMILY_CLASSES, AnyFamily, LLMFamily

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
