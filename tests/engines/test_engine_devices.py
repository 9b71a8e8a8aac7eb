"""Engines honour the GPU indices placement books for a replica (``xdask.engines.devices``).

The mapping of indices to ``CUDA_VISIBLE_DEVICES``, ``spawn_env`` and each
engine's option mapping are pure and run anywhere. This machine has no GPU,
so the loads at the end check the other half of the contract: a replica
given GPU labels still loads and runs on the CPU, and says what it was given.
The CUDA paths themselves (a model really on ``cuda:1``, a vLLM engine core
seeing only its GPUs) are not exercised here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from support.servers import engine_required

from xdask.engines import create_engine
from xdask.engines.base import Delta, SamplingParams
from xdask.engines.devices import (
    CUDA_VISIBLE_DEVICES,
    cuda_visible_devices,
    normalize_gpu_idx,
    spawn_env,
)
from xdask.errors import InvalidRequestError
from xdask.registry import resolve

GEMMA = ("gemma-3-270m", "ggufv2", None, "Q4_K_M")
LLAMA_CPP_MODULES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}


# == cuda_visible_devices ==============================================================


def test_ordinals_map_through_the_workers_own_list():
    assert cuda_visible_devices([1], base="4,5") == "5"
    assert cuda_visible_devices([1, 0], base=" 4 , 5 ") == "5,4"
    assert cuda_visible_devices([], base="4,5") == ""


def test_uuids_pass_through():
    base = "GPU-0a1b2c3d-aaaa-bbbb-cccc-000000000000,GPU-0a1b2c3d-aaaa-bbbb-cccc-111111111111,MIG-7f00"
    assert cuda_visible_devices([1, 2], base=base) == "GPU-0a1b2c3d-aaaa-bbbb-cccc-111111111111,MIG-7f00"


def test_default_base_is_this_process_and_unset_is_identity(monkeypatch):
    monkeypatch.delenv(CUDA_VISIBLE_DEVICES, raising=False)
    assert cuda_visible_devices([2, 3]) == "2,3"
    monkeypatch.setenv(CUDA_VISIBLE_DEVICES, "6,7,8")
    assert cuda_visible_devices([2, 0]) == "8,6"


@pytest.mark.parametrize(("idx", "base"), [([2], "0,1"), ([0], ""), ([-1], None)])
def test_an_index_the_worker_does_not_see_is_a_400(idx, base, monkeypatch):
    monkeypatch.delenv(CUDA_VISIBLE_DEVICES, raising=False)
    with pytest.raises(InvalidRequestError, match=f"GPU index {idx[0]} is not a device of this worker") as err:
        cuda_visible_devices(idx, base=base)
    assert err.value.status == 400 and err.value.param == "gpu_idx"


def test_normalize_gpu_idx():
    assert normalize_gpu_idx(None) is None
    assert normalize_gpu_idx((1, 0)) == [1, 0]
    for bad in ([1, 1], [-2], ["x"]):
        with pytest.raises(InvalidRequestError):
            normalize_gpu_idx(bad)


# == spawn_env =========================================================================


def test_spawn_env_sets_then_restores(monkeypatch):
    monkeypatch.setenv(CUDA_VISIBLE_DEVICES, "4,5,6")
    with spawn_env([2, 0]) as value:
        assert value == os.environ[CUDA_VISIBLE_DEVICES] == "6,4"
        # A child started inside sees only the booked GPUs, in the physical numbering.
        out = subprocess.run([sys.executable, "-c", f"import os; print(os.environ[{CUDA_VISIBLE_DEVICES!r}])"],
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "6,4"
    assert os.environ[CUDA_VISIBLE_DEVICES] == "4,5,6"


def test_spawn_env_unsets_what_was_unset_even_on_error(monkeypatch):
    monkeypatch.delenv(CUDA_VISIBLE_DEVICES, raising=False)
    with pytest.raises(RuntimeError), spawn_env([1]):
        assert os.environ[CUDA_VISIBLE_DEVICES] == "1"
        raise RuntimeError("engine start failed")
    assert CUDA_VISIBLE_DEVICES not in os.environ


def test_spawn_env_none_changes_nothing_and_empty_hides_every_gpu(monkeypatch):
    monkeypatch.setenv(CUDA_VISIBLE_DEVICES, "3")
    with spawn_env(None) as value:
        assert value is None and os.environ[CUDA_VISIBLE_DEVICES] == "3"
    with spawn_env([]) as value:
        assert value == os.environ[CUDA_VISIBLE_DEVICES] == ""
    assert os.environ[CUDA_VISIBLE_DEVICES] == "3"


def test_spawn_env_bad_index_leaves_the_env_alone(monkeypatch):
    monkeypatch.setenv(CUDA_VISIBLE_DEVICES, "0,1")
    with pytest.raises(InvalidRequestError), spawn_env([5]):
        pass
    assert os.environ[CUDA_VISIBLE_DEVICES] == "0,1"


def test_spawn_env_from_two_threads_each_sees_its_own_value(monkeypatch):
    monkeypatch.setenv(CUDA_VISIBLE_DEVICES, "4,5")
    start = threading.Barrier(2)
    inside: list[int] = []
    overlapped: list[bool] = []
    seen: dict[int, tuple[str | None, set[str]]] = {}

    def engine_start(i: int) -> None:
        start.wait()
        with spawn_env([i]) as value:
            inside.append(i)
            overlapped.append(len(inside) > 1)
            values = set()
            for _ in range(20):  # a slow start: the other thread must wait, not overwrite
                values.add(os.environ[CUDA_VISIBLE_DEVICES])
                time.sleep(0.005)
            seen[i] = (value, values)
            inside.remove(i)

    threads = [threading.Thread(target=engine_start, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0: ("4", {"4"}), 1: ("5", {"5"})}
    assert overlapped == [False, False]
    assert os.environ[CUDA_VISIBLE_DEVICES] == "4,5"


# == per-engine option mapping (pure) ==================================================


def test_llama_cpp_split_per_placement():
    from xdask.engines.llama_cpp.options import LlamaCppOptions, gpu_split, padded_split

    base = LlamaCppOptions(n_ctx=512, n_parallel=1, n_threads=2)
    unplaced = base.placed(None)
    assert (unplaced.offload_layers, unplaced.split) == (-1, None)
    cpu = base.placed([])
    assert (cpu.offload_layers, cpu.split) == (0, None)
    one = base.placed([1])
    assert one.offload_layers == -1
    assert (one.split.main_gpu, one.split.split_mode, one.split.tensor_split) == (1, "none", ())
    assert one.split.mode_constant == "LLAMA_SPLIT_MODE_NONE"
    two = base.placed([2, 3]).split
    assert (two.main_gpu, two.split_mode, two.tensor_split) == (2, "layer", (0.0, 0.0, 1.0, 1.0))
    assert gpu_split([3, 1]).tensor_split == (0.0, 1.0, 0.0, 1.0)
    assert padded_split((0.0, 1.0), 4) == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(InvalidRequestError, match="beyond the 2 devices"):
        padded_split((0.0, 0.0, 1.0), 2)


def test_llama_cpp_explicit_n_gpu_layers_wins_unless_there_is_no_gpu():
    from xdask.engines.llama_cpp.options import LlamaCppOptions

    opts = LlamaCppOptions.build(2048, {"n_gpu_layers": "0", "n_ctx": 512})
    assert opts.placed([1]).offload_layers == 0  # the user keeps the model on the CPU
    assert LlamaCppOptions.build(2048, {"n_gpu_layers": 8}).placed([1]).offload_layers == 8
    with pytest.raises(InvalidRequestError, match="n_gpu_layers=8 offloads layers to a GPU") as err:
        LlamaCppOptions.build(2048, {"n_gpu_layers": 8}).placed([])
    assert err.value.status == 400


def test_transformers_device_per_placement():
    from xdask.engines.transformers.options import choose_device

    assert choose_device("auto", None, cuda=True) == "cuda"
    assert choose_device("auto", None, cuda=False) == "cpu"
    assert choose_device("auto", [1], cuda=True) == "cuda:1"
    assert choose_device("cuda", [1], cuda=True) == "cuda:1"
    assert choose_device("cuda:1", [1], cuda=True) == "cuda:1"
    assert choose_device("auto", [], cuda=True) == "cpu"
    assert choose_device("cpu", [1], cuda=True) == "cpu"  # explicit wins


def test_transformers_without_cuda_falls_back_to_the_cpu_with_a_warning(caplog):
    from xdask.engines.transformers.options import choose_device

    with caplog.at_level(logging.WARNING, logger="xdask.engines.transformers.options"):
        assert choose_device("auto", [1], cuda=False) == "cpu"
    assert "GPU 1 was booked" in caplog.text


@pytest.mark.parametrize(
    ("device", "gpu_idx", "message"),
    [
        ("auto", [0, 1], "runs a replica on one GPU"),
        ("cuda:2", [1], "not the GPU booked for this replica"),
        ("cuda", [], "placed without one"),
    ],
)
def test_transformers_device_contradicting_placement_is_a_400(device, gpu_idx, message):
    from xdask.engines.transformers.options import check_device

    with pytest.raises(InvalidRequestError, match=message) as err:
        check_device(device, gpu_idx)
    assert err.value.status == 400


def test_vllm_args_per_placement(caplog):
    from xdask.engines.vllm_engine import placement_args

    assert placement_args(None, None, 1, on_cuda=True) == {}
    assert placement_args([0], None, 1, on_cuda=True) == {"tensor_parallel_size": 1}
    assert placement_args([2, 3], None, 1, on_cuda=True) == {"tensor_parallel_size": 2}
    assert placement_args([0, 1, 2, 3], None, 2, on_cuda=True) == {"tensor_parallel_size": 2}
    assert placement_args([0, 1], 1, 1, on_cuda=True) == {"tensor_parallel_size": 1}  # explicit, fewer: allowed
    with caplog.at_level(logging.WARNING, logger="xdask.engines.vllm_engine"):
        assert placement_args([0], None, 1, on_cuda=False) == {}  # the CPU build: labels only
    assert "ignored" in caplog.text
    assert placement_args([], None, 1, on_cuda=False) == {}


@pytest.mark.parametrize(
    ("gpu_idx", "tp", "pp", "message"),
    [
        ([0], 2, 1, "tensor_parallel_size=2 needs 2 GPUs, but this vllm replica has 1 booked"),
        ([0, 1], 2, 2, "needs 4 GPUs"),
        ([0, 1, 2], None, 2, "cannot be divided by pipeline_parallel_size=2"),
        ([], None, 1, "needs a GPU here"),
    ],
)
def test_vllm_contradictions_are_400(gpu_idx, tp, pp, message):
    from xdask.engines.vllm_engine import placement_args

    with pytest.raises(InvalidRequestError, match=message) as err:
        placement_args(gpu_idx, tp, pp, on_cuda=True)
    assert err.value.status == 400


def test_vllm_make_engine_with_placement(monkeypatch):
    from xdask.engines import vllm_engine

    monkeypatch.setattr(vllm_engine, "cuda_available", lambda: True)
    eng = vllm_engine.build_engine("/no/such/model", 2048, {}, gpu_idx=[1, 2])
    assert eng.options.tensor_parallel_size == 2 and eng.describe()["gpu_idx"] == [1, 2]
    assert vllm_engine.build_engine("/no/such/model", 2048, {"tensor_parallel_size": 1}, gpu_idx=[1, 2]) \
        .options.tensor_parallel_size == 1
    assert vllm_engine.build_engine("/no/such/model", 2048, {}).options.tensor_parallel_size == 1  # not placed
    monkeypatch.setattr(vllm_engine, "cuda_available", lambda: False)
    eng = vllm_engine.build_engine("/no/such/model", 2048, {}, gpu_idx=[0])
    assert eng.options.tensor_parallel_size == 1 and eng.describe()["gpu_idx"] == [0]


def test_sglang_server_args_per_placement():
    from xdask.engines.sglang_engine import SGLangOptions, build_engine, placed_options

    def placed(kwargs, gpu_idx):
        return placed_options(SGLangOptions.from_kwargs("sglang", kwargs), gpu_idx).engine_kwargs()

    assert placed({}, None) == {}
    assert placed({}, [3]) == {"tp_size": 1, "base_gpu_id": 0}
    assert placed({}, [2, 3]) == {"tp_size": 2, "base_gpu_id": 0}
    assert placed({"dp_size": 2}, [0, 1, 2, 3]) == {"tp_size": 2, "dp_size": 2, "base_gpu_id": 0}
    assert placed({"base_gpu_id": 0}, [5]) == {"tp_size": 1, "base_gpu_id": 0}
    eng = build_engine("/no/such/model", 2048, {}, gpu_idx=[2, 3])
    assert eng.describe()["gpu_idx"] == [2, 3] and eng.describe()["tp_size"] == 2


@pytest.mark.parametrize(
    ("kwargs", "gpu_idx", "message"),
    [
        ({"tp_size": 2}, [0], "tp_size=2 needs 2 GPUs"),
        ({"base_gpu_id": 1}, [0, 1], "base_gpu_id=1 conflicts"),
        ({}, [], "needs a GPU here"),
    ],
)
def test_sglang_contradictions_are_400(kwargs, gpu_idx, message):
    from xdask.engines.sglang_engine import build_engine

    with pytest.raises(InvalidRequestError, match=message) as err:
        build_engine("/no/such/model", 2048, kwargs, gpu_idx=gpu_idx)
    assert err.value.status == 400


def test_mlx_ignores_gpu_idx_but_shows_it():
    from xdask.engines.mlx_engine import build_engine

    assert build_engine("/no/such/model", 2048, {}, gpu_idx=[1]).describe()["gpu_idx"] == [1]
    assert build_engine("/no/such/model", 2048, {}).describe()["gpu_idx"] is None


def test_create_engine_passes_gpu_idx_and_rejects_contradictions(monkeypatch):
    from xdask.engines import vllm_engine

    resolved = resolve(*GEMMA)
    assert create_engine(resolved, "mlx", "/no/such/model", {}, gpu_idx=[1]).describe()["gpu_idx"] == [1]
    with pytest.raises(InvalidRequestError, match="runs a replica on one GPU"):
        create_engine(resolved, "transformers", "/no/such/model", {}, gpu_idx=[0, 1])
    monkeypatch.setattr(vllm_engine, "cuda_available", lambda: True)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size=2 needs 2 GPUs"):
        create_engine(resolved, "vllm", "/no/such/model", {"tensor_parallel_size": 2}, gpu_idx=[0])
    with pytest.raises(InvalidRequestError, match="n_gpu_layers=4 offloads"):
        create_engine(resolved, "llama.cpp", "/no/such/model.gguf", {"n_gpu_layers": 4}, gpu_idx=[])


# == real loads on this CPU with GPU labels ============================================


def require_backend(backend: str) -> None:
    """As in test_llama_cpp_engines.py: CI (XDASK_TEST_REQUIRE_BACKENDS=1) fails where a backend is missing."""
    if importlib.util.find_spec(LLAMA_CPP_MODULES[backend]) is None:
        if os.environ.get("XDASK_TEST_REQUIRE_BACKENDS") == "1":
            pytest.fail(f"{backend} is not installed but CI requires it")
        pytest.skip(f"{backend} is not installed")


def require_transformers() -> None:
    if not engine_required("transformers"):
        pytest.importorskip("transformers", reason="transformers is not installed here")
        pytest.importorskip("torch", reason="torch is not installed here")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    import dask.config

    from xdask.hub import locate_model

    with dask.config.set({"xdask.home": str(tmp_path_factory.mktemp("home"))}):
        return str(locate_model(resolve(*GEMMA)))


def generate(engine, prompt: str, max_tokens: int) -> tuple[str, Delta]:
    pieces: list[Delta] = []
    engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                    lambda d: pieces.append(d) or False)
    return "".join(d.text for d in pieces), pieces[-1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xllamacpp", "llama-cpp-python"])
def test_llama_cpp_loads_with_a_gpu_label_on_a_cpu_build(backend, gguf_path):
    from xdask.engines.llama_cpp import build_engine
    from xdask.engines.llama_cpp.options import LlamaCppOptions

    require_backend(backend)
    options = LlamaCppOptions(n_ctx=512, n_parallel=1, n_threads=2)
    eng = build_engine(gguf_path, backend, {"options": options}, gpu_idx=[1])
    eng.load()
    try:
        text, last = generate(eng, "1, 2, 3, 4, 5,", 4)
        assert text.startswith(" 6") and last.finish_reason == "length"
        facts = eng.describe()
        assert facts["gpu_idx"] == [1] and facts["split_mode"] == "none" and facts["n_gpu_layers"] == -1
    finally:
        eng.close()


@pytest.mark.slow
@pytest.mark.parametrize(("gpu_idx", "warned"), [([1], True), ([], False)])
def test_transformers_runs_on_the_cpu_with_gpu_labels(gpu_idx, warned, tiny_qwen2, caplog):
    require_transformers()
    import torch

    from xdask.engines.transformers import build_engine

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback; CUDA is available here")
    eng = build_engine(str(tiny_qwen2), 2048, {"max_batch_size": 2}, gpu_idx=gpu_idx)
    with caplog.at_level(logging.WARNING, logger="xdask.engines.transformers.options"):
        eng.load()
    try:
        _, last = generate(eng, "Hello there", 3)
        assert last.completion_tokens is not None and last.completion_tokens <= 3
        facts = eng.describe()
        assert facts["device"] == "cpu" and facts["gpu_idx"] == gpu_idx
        assert ("torch sees no CUDA" in caplog.text) is warned
    finally:
        eng.close()
