#!/usr/bin/env bash
# Build and install llama-cpp-python, the second llama.cpp backend.
#
# Why a script of its own: it compiles llama.cpp from source (about 9 minutes on
# 2 cores), so CI runs it as a separate step and caches the wheel. The default
# CMake flags build with -march=native, which on some of these VMs enables AMX
# that the hypervisor forbids (SIGILL at the first token); so the ISA is pinned
# instead, to what this CPU reports in /proc/cpuinfo (an AMD EPYC here has AVX2
# but no AVX-512: a build with AVX-512 on dies with SIGILL at load). AMX stays off.
set -euo pipefail

VERSION="${XDASK_LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
isa() {  # ON when the CPU reports every named flag
  for flag in "$@"; do [[ "$cpu_flags" == *" $flag "* ]] || { echo OFF; return; }; done
  echo ON
}
default_args="-DGGML_NATIVE=OFF -DGGML_AVX=$(isa avx) -DGGML_AVX2=$(isa avx2) -DGGML_FMA=$(isa fma) \
-DGGML_F16C=$(isa f16c) -DGGML_BMI2=$(isa bmi2) -DGGML_AVX512=$(isa avx512f avx512bw avx512vl) \
-DGGML_AVX512_VBMI=$(isa avx512_vbmi) -DGGML_AVX512_VNNI=$(isa avx512_vnni) -DGGML_AVX512_BF16=$(isa avx512_bf16) \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
export CMAKE_ARGS="${XDASK_LLAMA_CPP_CMAKE_ARGS:-$default_args}"
echo "llama-cpp-python CMAKE_ARGS: $CMAKE_ARGS"
PYTHON="${PYTHON:-python}"

# The wheel cache is keyed by version and flags: pip's own wheel cache ignores
# CMAKE_ARGS and could hand back a wheel built with the crashing defaults.
key=$(printf '%s %s' "$VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
cache="${XDASK_WHEEL_CACHE:-$HOME/.cache/xdask-ci/wheels}/llama-cpp-python-$key"

installed=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)
marker="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.xdask-llama-cpp-python-$key"
if [[ "$installed" == "$VERSION" && -f "$marker" ]]; then
  echo "llama-cpp-python $VERSION already installed with the pinned flags"
  exit 0
fi

if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (about 9 minutes on 2 cores)"
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PYTHON" -m pip wheel --no-deps --no-binary llama-cpp-python \
    --no-cache-dir -w "$tmp" "llama-cpp-python==$VERSION"
  mv "$tmp"/llama_cpp_python-*.whl "$cache"/
  rm -rf "$tmp"
fi
"$PYTHON" -m pip install --force-reinstall --no-deps "$cache"/llama_cpp_python-*.whl
# Its runtime dependencies, without touching numpy's installed version.
"$PYTHON" -m pip install 'diskcache>=5.6.1' 'jinja2>=2.11.3' 'typing-extensions>=4.5.0' 'numpy>=1.20.0'
touch "$marker"
