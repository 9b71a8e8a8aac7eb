"""Model families and specs: the catalog that launches are checked against."""

from xdask.registry.builtins import MODEL_TYPES, builtin_families, builtin_llm_families, normalize_model_type
from xdask.registry.custom import register, unregister
from xdask.registry.families import get_family, list_families, resolve
from xdask.registry.specs import (
    AudioFamily,
    EmbeddingFamily,
    ImageFamily,
    LLMFamily,
    ModelSource,
    ModelSpec,
    RerankFamily,
    ResolvedModel,
)

__all__ = [
    "MODEL_TYPES",
    "AudioFamily",
    "EmbeddingFamily",
    "ImageFamily",
    "LLMFamily",
    "ModelSource",
    "ModelSpec",
    "RerankFamily",
    "ResolvedModel",
    "builtin_families",
    "builtin_llm_families",
    "get_family",
    "list_families",
    "normalize_model_type",
    "register",
    "resolve",
    "unregister",
]
