"""Model families and specs: the catalog that launches are checked against."""

from xdask.registry.families import (
    builtin_llm_families,
    get_family,
    list_families,
    resolve,
)
from xdask.registry.specs import LLMFamily, ModelSource, ModelSpec, ResolvedModel

__all__ = [
    "LLMFamily",
    "ModelSource",
    "ModelSpec",
    "ResolvedModel",
    "builtin_llm_families",
    "get_family",
    "list_families",
    "resolve",
]
