"""How much memory one model replica needs: weights + KV cache + activations + overhead.

Why estimate at all: a launch that cannot fit should be refused at once with
the numbers, not die minutes later with the worker's out-of-memory kill; and
``xdask cal-model-mem`` answers "will it fit?" before anything is downloaded.
Placement (``estimate_replica_bytes``) and the CLI use the same function,
``estimate_memory``; checks can be turned off with
``xdask.placement.check-memory: false``.

The formula (bytes)::

    weights    = the weight files' size when they are on disk (GGUF, AWQ, ...),
                 else params x bits per weight / 8 (fp16/bf16 16, fp8/int8 8,
                 AWQ/GPTQ 4.5, GGUF by quantization: Q4_K_M 4.85, Q8_0 8.5, F16 16 ...)
    kv_cache   = 2 (K and V) x layers x kv_heads x head_dim x tokens x batch x kv bytes
                 (tokens = the context; layers with sliding-window attention hold
                 only their window)
    activation = batch x min(context, prefill chunk of 512) x (4 x hidden + 2 x ffn) x 4
                 + batch x vocab x 4 (the logits of the last position)
    overhead   = runtime bytes (256 MiB: allocator, CUDA context, engine buffers)
                 + (memory margin - 1) x weights

The architecture (layers, heads, KV heads, head size, hidden size) comes from
the model's ``config.json`` or its GGUF metadata, read from ``model_path`` or
the cache; ``xdask cal-model-mem`` may also fetch only ``config.json`` from
Hugging Face (a few KB). With none of them, a size-only heuristic (documented
at ``heuristic_arch``) stands in and the result says so.

Examples
--------
>>> arch = arch_from_config({"num_hidden_layers": 32, "num_attention_heads": 32,
...                          "num_key_value_heads": 8, "hidden_size": 4096})
>>> est = estimate_memory(8, "pytorch", "none", 8192, arch=arch)
>>> est.kv_cache_bytes / 2**30   # 2 x 32 x 8 x 128 x 8192 x 2 bytes
1.0
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from xdask import config
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

#: Bits per weight of llama.cpp quantization types (llama.cpp's own figures for 7B models).
_GGUF_BITS = {
    "IQ1_S": 1.56, "IQ1_M": 1.75, "IQ2_XXS": 2.06, "IQ2_XS": 2.31, "IQ2_S": 2.5, "IQ2_M": 2.7,
    "IQ3_XXS": 3.06, "IQ3_XS": 3.3, "IQ3_S": 3.44, "IQ3_M": 3.66, "IQ4_XS": 4.25, "IQ4_NL": 4.5,
    "Q2_K": 2.96, "Q3_K_S": 3.5, "Q3_K_M": 3.91, "Q3_K_L": 4.27, "Q3_K": 3.91,
    "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K_S": 4.58, "Q4_K_M": 4.85, "Q4_K": 4.85,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K_S": 5.54, "Q5_K_M": 5.69, "Q5_K": 5.69,
    "Q6_K": 6.56, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0, "F32": 32.0,
}

#: Bytes per element of a KV cache dtype (names as engines spell them; "16" is Xinference's spelling).
_KV_BYTES = {
    "fp32": 4.0, "float32": 4.0, "f32": 4.0, "32": 4.0,
    "fp16": 2.0, "float16": 2.0, "f16": 2.0, "bf16": 2.0, "bfloat16": 2.0, "16": 2.0, "auto": 2.0,
    "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "int8": 1.0, "q8_0": 1.0625, "8": 1.0,
    "q4_0": 0.5625, "int4": 0.5, "4": 0.5,
}

#: Tokens whose activations are live at once during prefill (llama.cpp's n_ubatch; vLLM chunks too).
_PREFILL_CHUNK = 512

#: llama.cpp hard-codes Gemma 3's layout: every 6th layer is global, the rest use the sliding window.
_GGUF_SWA_PATTERN = {"gemma3": 6, "gemma3n": 5}


@dataclass
class ArchFacts:
    """The shape facts the KV cache and activations depend on."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    hidden_size: int
    head_dim: int
    intermediate_size: int | None = None
    vocab_size: int | None = None
    #: Tokens a sliding-window layer keeps, and how many layers use it (0: none).
    sliding_window: int | None = None
    sliding_layers: int = 0
    #: Where the facts came from: "config.json <path>", "gguf <path>", "size heuristic".
    source: str = ""


@dataclass
class MemoryEstimate:
    """The breakdown, in bytes, and what it assumed."""

    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    context_length: int
    batch: int
    kv_cache_dtype: str
    arch: ArchFacts
    #: "file size" (weights measured on disk) or "params x bits".
    weights_from: str
    notes: list[str] = field(default_factory=list)
    #: The spec estimated.
    model_format: str | None = None
    model_size_in_billions: float | None = None
    quantization: str | None = None

    @property
    def from_size_only(self) -> bool:
        """True when no config.json or GGUF was reachable (the heuristic stood in)."""
        return self.arch.source == "size heuristic"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with MiB figures beside the bytes (what the CLI and HTTP show)."""
        out = asdict(self)
        for key in ("weights", "kv_cache", "activation", "overhead", "total"):
            out[f"{key}_mib"] = math.ceil(out[f"{key}_bytes"] / 2**20)
        out["from_size_only"] = self.from_size_only
        return out


# -- architecture facts ------------------------------------------------------------


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def arch_from_config(cfg: dict[str, Any], source: str = "config.json") -> ArchFacts:
    """Facts from a Hugging Face ``config.json`` (its ``text_config`` for multimodal models).

    Raises ``ValueError`` when layers, heads or hidden size are missing.
    """
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer")
    heads = _first(cfg, "num_attention_heads", "num_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "d_model", "n_embd")
    if layers is None or heads is None or hidden is None:
        raise ValueError(f"{source}: needs num_hidden_layers, num_attention_heads and hidden_size")
    kv_heads = _first(cfg, "num_key_value_heads", "num_kv_heads", "multi_query_group_num") or heads
    head_dim = cfg.get("head_dim") or int(hidden) // int(heads)
    window, sliding = None, 0
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and cfg.get("sliding_window"):
        sliding = sum(1 for t in layer_types if "sliding" in str(t))
    elif cfg.get("sliding_window_pattern") and cfg.get("sliding_window"):
        pattern = int(cfg["sliding_window_pattern"])  # every pattern-th layer is global
        sliding = int(layers) - int(layers) // pattern
    elif cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        # Qwen2 style: the layers from max_window_layers on use the window.
        sliding = max(0, int(layers) - int(cfg.get("max_window_layers") or 0))
    if sliding:
        window = int(cfg["sliding_window"])
    return ArchFacts(
        num_layers=int(layers), num_attention_heads=int(heads), num_kv_heads=int(kv_heads),
        hidden_size=int(hidden), head_dim=int(head_dim),
        intermediate_size=_int_or_none(_first(cfg, "intermediate_size", "n_inner", "d_ff", "ffn_hidden_size")),
        vocab_size=_int_or_none(cfg.get("vocab_size")), sliding_window=window, sliding_layers=sliding,
        source=source,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def arch_from_gguf(path: str | pathlib.Path) -> ArchFacts | None:
    """Facts from a GGUF file's metadata (``<arch>.block_count`` ...), or None if unreadable."""
    from xdask.engines.gguf_meta import read_gguf_metadata

    arch = read_gguf_metadata(str(path), ("general.architecture",)).get("general.architecture")
    if not arch:
        return None
    names = ("block_count", "attention.head_count", "attention.head_count_kv", "embedding_length",
             "attention.key_length", "feed_forward_length", "attention.sliding_window", "vocab_size")
    meta = read_gguf_metadata(str(path), tuple(f"{arch}.{n}" for n in names))

    def get(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    layers, heads, hidden = get("block_count"), get("attention.head_count"), get("embedding_length")
    if not layers or not heads or not hidden:
        return None
    heads = max(heads) if isinstance(heads, list) else heads  # per-layer arrays in some models
    kv_heads = get("attention.head_count_kv") or heads
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else kv_heads
    ffn = get("feed_forward_length")
    window = get("attention.sliding_window")
    pattern = _GGUF_SWA_PATTERN.get(arch)
    sliding = int(layers) - int(layers) // pattern if window and pattern else 0
    return ArchFacts(
        num_layers=int(layers), num_attention_heads=int(heads), num_kv_heads=int(kv_heads),
        hidden_size=int(hidden), head_dim=int(get("attention.key_length") or hidden // heads),
        intermediate_size=int(max(ffn) if isinstance(ffn, list) else ffn) if ffn else None,
        vocab_size=_int_or_none(get("vocab_size")), sliding_window=int(window) if sliding else None,
        sliding_layers=sliding, source=f"gguf {path}",
    )


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf", ".npz")]


def arch_from_path(path: str | pathlib.Path, prefer_file: str | None = None) -> tuple[ArchFacts | None, int | None]:
    """Facts and weight bytes from a model on disk: a GGUF file, a config.json or a model folder.

    ``prefer_file`` names the GGUF to read in a folder holding several. The
    weight bytes are None when no weight file is there (a config.json alone).
    """
    p = pathlib.Path(path).expanduser()
    try:
        if p.is_file() and p.suffix == ".gguf":
            return arch_from_gguf(p), p.stat().st_size
        if p.is_file() and p.name.endswith(".json"):
            return arch_from_config(json.loads(p.read_text(encoding="utf-8")), f"config.json {p}"), None
        if not p.is_dir():
            return None, None
        weights = _weight_files(p)
        ggufs = [w for w in weights if w.suffix == ".gguf"]
        if (p / "config.json").is_file():
            arch = arch_from_config(json.loads((p / "config.json").read_text(encoding="utf-8")),
                                    f"config.json {p / 'config.json'}")
            size = sum(w.stat().st_size for w in weights if w.suffix != ".gguf")
            return arch, size or None
        if ggufs:
            chosen = next((g for g in ggufs if g.name == prefer_file), ggufs[0])
            return arch_from_gguf(chosen), chosen.stat().st_size
    except (OSError, ValueError) as exc:
        logger.debug("No architecture facts from %s: %s", p, exc)
    return None, None


def heuristic_arch(size_in_billions: float) -> ArchFacts:
    """Facts guessed from the parameter count alone (no config.json or GGUF reachable).

    A Llama-shaped model: layers by size (<1B 24, <5B 28, <10B 32, <24B 40,
    <55B 64, else 80), hidden size from params ~= 12 x layers x hidden^2,
    head size 128 (64 under 1B), and grouped-query attention with a quarter of
    the heads as KV heads (Llama 3, Qwen 2.5, Mistral, Gemma 3 have 1/4 to 1/8).
    For those models it overestimates the KV cache by up to 2x; for old
    multi-head models it underestimates it by 4x: hence "estimated from size only".
    """
    params = max(size_in_billions, 0.01) * 1e9
    layers = next((n for limit, n in ((1, 24), (5, 28), (10, 32), (24, 40), (55, 64)) if size_in_billions < limit), 80)
    head_dim = 64 if size_in_billions < 1 else 128
    hidden = max(head_dim, round(math.sqrt(params / (12 * layers)) / head_dim) * head_dim)
    heads = max(1, hidden // head_dim)
    return ArchFacts(
        num_layers=layers, num_attention_heads=heads, num_kv_heads=max(1, heads // 4), hidden_size=hidden,
        head_dim=head_dim, intermediate_size=4 * hidden, vocab_size=None, source="size heuristic",
    )


# -- the estimate ------------------------------------------------------------------


def parse_size(size: Any) -> float | None:
    """``"0_27"``, ``"7"``, ``1.5`` -> billions as a float, or None."""
    try:
        return float(str(size).replace("_", "."))
    except (TypeError, ValueError):
        return None


def bits_per_weight(model_format: str, quantization: str | None, on_gpu: bool) -> float:
    """Stored bits per parameter for a format and quantization."""
    quant = (quantization or "").upper().replace("-", "_")
    if model_format in ("ggufv2", "gguf"):
        for name in sorted(_GGUF_BITS, key=len, reverse=True):  # Q4_K_M before Q4_K
            if quant.startswith(name):
                return _GGUF_BITS[name]
        return 6.0
    if model_format in ("awq", "gptq"):
        m = re.search(r"(\d+)", quant)
        return (float(m.group(1)) if m else 4.0) + 0.5  # + scales and zeros per group
    if model_format == "fp8" or quant in ("FP8", "INT8", "8_BIT", "8BIT"):
        return 8.0
    if quant in ("INT4", "4_BIT", "4BIT", "NF4", "FP4"):
        return 4.5
    if model_format == "mlx":
        m = re.match(r"(\d+)BIT", quant)
        return float(m.group(1)) + 0.5 if m else 16.0
    # pytorch/safetensors: bf16 on a GPU, float32 on the CPU (the transformers engine's defaults).
    return 16.0 if on_gpu else 32.0


def kv_bytes_per_element(kv_cache_dtype: str | int | None) -> float:
    """Bytes of one KV element for a dtype name (fp16, fp8, q8_0, 16, 8 ...); 400 if unknown."""
    name = str(kv_cache_dtype if kv_cache_dtype is not None else "fp16").lower()
    if name not in _KV_BYTES:
        from xdask.errors import InvalidRequestError

        raise InvalidRequestError(
            f"Unknown kv_cache_dtype {kv_cache_dtype!r}; known: fp32, fp16, bf16, fp8, int8, q8_0, q4_0 (or 32/16/8)",
            param="kv_cache_dtype",
        )
    return _KV_BYTES[name]


def kv_cache_bytes(arch: ArchFacts, context_length: int, batch: int = 1, kv_bytes: float = 2.0) -> int:
    """``2 x layers x kv_heads x head_dim x tokens x batch x kv_bytes``; windowed layers hold their window."""
    per_token_layer = 2 * arch.num_kv_heads * arch.head_dim * kv_bytes
    full = arch.num_layers - arch.sliding_layers
    windowed_tokens = min(context_length, arch.sliding_window or context_length)
    tokens = full * context_length + arch.sliding_layers * windowed_tokens
    return int(per_token_layer * tokens * batch)


def activation_bytes(arch: ArchFacts, context_length: int, batch: int = 1) -> int:
    """Live fp32 activations of one prefill chunk plus the last position's logits."""
    chunk = min(context_length, int(config.get("placement.prefill-chunk", _PREFILL_CHUNK)))
    ffn = arch.intermediate_size or 4 * arch.hidden_size
    logits = (arch.vocab_size or 32000) * 4
    return int(batch * (chunk * (4 * arch.hidden_size + 2 * ffn) * 4 + logits))


def estimate_memory(
    size_in_billions: float | str | None,
    model_format: str,
    quantization: str | None,
    context_length: int,
    *,
    arch: ArchFacts | None = None,
    weights_file_bytes: int | None = None,
    batch: int = 1,
    kv_cache_dtype: str | int | None = None,
    on_gpu: bool = True,
) -> MemoryEstimate:
    """Weights + KV cache + activations + overhead of one replica.

    ``arch`` None (nothing readable) uses ``heuristic_arch``;
    ``weights_file_bytes`` (the files on disk) replaces params x bits, except
    that pytorch weights upcast to float32 on the CPU take at least params x 4.
    """
    size = parse_size(size_in_billions)
    notes: list[str] = []
    if arch is None:
        if size is None:
            raise ValueError("neither the model's architecture nor its size is known")
        arch = heuristic_arch(size)
        notes.append("estimated from size only: no config.json or GGUF metadata was reachable")
    bits = bits_per_weight(model_format, quantization, on_gpu)
    computed = size * 1e9 * bits / 8 if size is not None else None
    if weights_file_bytes:
        weights = float(weights_file_bytes)
        if model_format == "pytorch" and computed is not None:
            weights = max(weights, computed)
        weights_from = "file size"
    elif computed is not None:
        weights, weights_from = computed, "params x bits"
    else:
        raise ValueError("the model's size is unknown and its weights are not on disk")
    if kv_cache_dtype is None:
        # The transformers engine runs float32 on the CPU, and its cache follows the weights.
        kv_cache_dtype = "fp32" if model_format == "pytorch" and not on_gpu else "fp16"
    kv = kv_cache_bytes(arch, context_length, batch, kv_bytes_per_element(kv_cache_dtype))
    act = activation_bytes(arch, context_length, batch)
    margin = float(config.get("placement.memory-margin", 1.2))
    overhead = int(config.get("placement.runtime-bytes", 256 * 2**20)) + round(max(0.0, margin - 1) * weights)
    total = int(weights) + kv + act + overhead
    return MemoryEstimate(
        weights_bytes=int(weights), kv_cache_bytes=kv, activation_bytes=act, overhead_bytes=overhead,
        total_bytes=total, context_length=int(context_length), batch=batch, kv_cache_dtype=str(kv_cache_dtype),
        arch=arch, weights_from=weights_from, notes=notes, model_format=model_format,
        model_size_in_billions=size, quantization=quantization,
    )


# -- where the facts come from -----------------------------------------------------


def local_model_facts(resolved: ResolvedModel, model_path: str | None = None) -> tuple[ArchFacts | None, int | None]:
    """Facts from this machine's disk only: ``model_path`` if it exists here, else the cache folder."""
    from xdask.hub.locate import cache_dir

    file_name = resolved.spec.file_name(resolved.quantization) if hasattr(resolved.spec, "file_name") else None
    for candidate in (model_path, cache_dir(resolved)):
        if candidate and pathlib.Path(candidate).expanduser().exists():
            arch, weights = arch_from_path(candidate, prefer_file=file_name)
            if arch is not None:
                return arch, weights
    return None, None


def _hf_config(resolved: ResolvedModel) -> ArchFacts | None:
    """``config.json`` of the spec's Hugging Face repo, or of a same-size spec's (GGUF repos have none).

    Only that file is fetched (a few KB), never the weights.
    """
    try:
        import huggingface_hub
    except ImportError:
        return None
    specs = [resolved.spec] + [s for s in resolved.family.model_specs
                               if s is not resolved.spec and s.size_matches(resolved.spec.model_size_in_billions)]
    specs.sort(key=lambda s: s.model_format != "pytorch")  # full-precision repos always carry config.json
    tried = set()
    for spec in specs:
        for source in spec.sources:
            if source.hub != "huggingface" or source.model_id in tried:
                continue
            tried.add(source.model_id)
            try:
                path = huggingface_hub.hf_hub_download(source.model_id, "config.json", revision=source.revision)
                return arch_from_config(json.loads(pathlib.Path(path).read_text(encoding="utf-8")),
                                        f"config.json {source.model_id}")
            except Exception as exc:  # noqa: BLE001 - offline, gated, no such file: next source, then the heuristic
                logger.debug("No config.json from %s: %s", source.model_id, exc)
    return None


def launch_context_length(resolved: ResolvedModel, engine: str | None, engine_kwargs: dict[str, Any]) -> int:
    """The context a launch allocates: its ``n_ctx``/``max_model_len``/``context_length`` option,
    llama.cpp's slots x per-slot context, else the family's context length."""
    family_ctx = int(getattr(resolved.family, "context_length", 0) or 2048)
    for key in ("n_ctx", "max_model_len", "context_length", "max_seq_len"):
        value = _int_or_none(engine_kwargs.get(key))
        if value:
            return value
    if engine == "llama.cpp":
        from xdask.engines.llama_cpp.options import LlamaCppOptions

        try:
            return LlamaCppOptions.build(family_ctx, dict(engine_kwargs)).n_ctx
        except (TypeError, ValueError):
            pass
    return family_ctx


def estimate_replica_bytes(
    resolved: ResolvedModel,
    on_gpu: bool,
    *,
    engine: str | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    model_path: str | None = None,
) -> int:
    """Bytes one replica is expected to take, or 0 when unknown or checks are off.

    On the launch path: reads only this machine's disk (``model_path``, the
    cache) and never downloads; batch 1 at the launch's context.
    """
    if not config.get("placement.check-memory", True):
        return 0
    engine_kwargs = engine_kwargs or {}
    if resolved.family.model_type != "LLM":
        return task_model_bytes(resolved, model_path)
    try:
        arch, weights = local_model_facts(resolved, model_path)
        est = estimate_memory(
            resolved.spec.model_size_in_billions, resolved.spec.model_format, resolved.quantization,
            launch_context_length(resolved, engine, engine_kwargs), arch=arch, weights_file_bytes=weights,
            kv_cache_dtype=engine_kwargs.get("kv_cache_dtype") or engine_kwargs.get("cache_type_k"),
            on_gpu=on_gpu,
        )
    except Exception as exc:  # noqa: BLE001 - an estimate must never block a launch by failing itself
        logger.debug("No memory estimate for %s: %s", resolved.family.model_name, exc)
        return 0
    return est.total_bytes


#: Weight files of embedding, rerank, image and audio models.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def task_model_bytes(resolved: ResolvedModel, model_path: str | None = None) -> int:
    """An embedding, rerank, image or audio model: its weight files x margin + runtime bytes; 0 if not on disk.

    These models hold no KV cache; their activations are small next to the
    weights except for image models at large sizes, which the margin covers.
    """
    from xdask.hub.locate import cache_dir

    for candidate in (model_path, resolved.local_path(), cache_dir(resolved)):
        if not candidate:
            continue
        path = pathlib.Path(candidate).expanduser()
        if not path.exists():
            continue
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in _WEIGHT_SUFFIXES]
        weights = sum(f.stat().st_size for f in files if f.is_file())
        if weights:
            margin = float(config.get("placement.memory-margin", 1.2))
            return int(weights * margin) + int(config.get("placement.runtime-bytes", 256 * 2**20))
    return 0


def estimate_catalog_model(
    model_name: str,
    size_in_billions: str | float | None = None,
    model_format: str | None = None,
    quantization: str | None = None,
    context_length: int | None = None,
    *,
    batch: int = 1,
    kv_cache_dtype: str | int | None = None,
    model_path: str | None = None,
    download_config: bool = True,
    on_gpu: bool = True,
) -> MemoryEstimate:
    """``xdask cal-model-mem``: the estimate for a catalog spec, from the best facts reachable.

    Order: ``model_path``; the cache; ``config.json`` from Hugging Face (when
    ``download_config``); the size heuristic.
    """
    from xdask.registry import resolve

    resolved = resolve(model_name, model_format, size_in_billions, quantization)
    arch, weights = local_model_facts(resolved, model_path)
    if arch is None and download_config:
        arch = _hf_config(resolved)
    ctx = context_length or int(getattr(resolved.family, "context_length", 0) or 2048)
    est = estimate_memory(
        resolved.spec.model_size_in_billions, resolved.spec.model_format, resolved.quantization, ctx,
        arch=arch, weights_file_bytes=weights, batch=batch, kv_cache_dtype=kv_cache_dtype, on_gpu=on_gpu,
    )
    return est
