"""Placement as a pure function: GPUs, pins, replicas, memory, and the reasons it gives."""

from __future__ import annotations

import pytest

from xdask.cluster.placement import PlacementRequest, WorkerView, place_replicas
from xdask.errors import InsufficientResourcesError, InvalidRequestError

A, B, C = "tcp://10.0.0.1:4001", "tcp://10.0.0.2:4001", "tcp://10.0.0.2:4002"


def cluster(gpus: int = 2, **kw: int) -> dict[str, WorkerView]:
    return {a: WorkerView(a, gpus=gpus, **kw) for a in (A, B, C)}


def req(**kw) -> PlacementRequest:
    return PlacementRequest.from_launch(kw)


def test_parse_launch_fields() -> None:
    assert req().n_gpu is None  # auto
    assert req(n_gpu=None).n_gpu == 0 and req(n_gpu="none").n_gpu == 0 and req(n_gpu=0).n_gpu == 0
    assert req(n_gpu="2").n_gpu == 2
    assert req(gpu_idx=1).gpu_idx == [1] and req(gpu_idx=1).n_gpu == 1
    for bad in ({"n_gpu": "many"}, {"n_gpu": -1}, {"gpu_idx": [0, 0]}, {"gpu_idx": ["x"]},
                {"gpu_idx": [0, 1], "n_gpu": 1}, {"replica": 0}, {"replica": "2"}):
        with pytest.raises(InvalidRequestError):
            PlacementRequest.from_launch(bad)


def test_auto_takes_one_free_gpu_and_balances() -> None:
    out = place_replicas(cluster(), {A: {0: "m/0"}}, {A: 1}, req())
    assert out[0].address in (B, C) and out[0].gpu_idx == [0]


def test_auto_without_gpus_is_cpu() -> None:
    out = place_replicas(cluster(gpus=0), {}, {}, req())
    assert out[0].gpu_idx == []


def test_replicas_spread_over_workers_and_never_share_an_index() -> None:
    out = place_replicas(cluster(), {}, {}, req(n_gpu=1, replica=3))
    assert sorted(p.address for p in out) == sorted([A, B, C])
    out = place_replicas(cluster(), {}, {}, req(n_gpu=1, replica=6))
    pairs = [(p.address, i) for p in out for i in p.gpu_idx]
    assert len(pairs) == len(set(pairs)) == 6


def test_pins() -> None:
    out = place_replicas(cluster(), {}, {}, req(worker_address=B, gpu_idx=[1]))
    assert out[0].address == B and out[0].gpu_idx == [1]
    out = place_replicas(cluster(), {}, {}, req(worker_ip="10.0.0.2", n_gpu=1, replica=2))
    assert {p.address for p in out} == {B, C}
    with pytest.raises(InvalidRequestError, match="No worker has address"):
        place_replicas(cluster(), {}, {}, req(worker_address="tcp://10.9.9.9:1"))
    with pytest.raises(InvalidRequestError, match="No worker runs on"):
        place_replicas(cluster(), {}, {}, req(worker_ip="10.9.9.9"))


def test_unplaceable_says_why_for_every_worker() -> None:
    full = {a: {0: "x/0", 1: "y/0"} for a in (A, B, C)}
    with pytest.raises(InsufficientResourcesError) as err:
        place_replicas(cluster(), full, {}, req(n_gpu=1))
    assert err.value.status == 503 and err.value.code == "insufficient_resources"
    assert all(a in err.value.message for a in (A, B, C)) and "0 of 2 GPU(s) free" in err.value.message
    with pytest.raises(InsufficientResourcesError, match="GPU 1 by y/0"):
        place_replicas(cluster(), full, {}, req(worker_address=A, gpu_idx=[1]))
    out = place_replicas(cluster(), full, {}, req(worker_address=A, gpu_idx=[1], allow_shared_gpu=True))
    assert out[0].gpu_idx == [1]
    with pytest.raises(InsufficientResourcesError, match="no index"):
        place_replicas(cluster(), {}, {}, req(gpu_idx=[5]))
    with pytest.raises(InsufficientResourcesError, match=r"1 of 3 replicas placed"):
        place_replicas(cluster(), {}, {}, req(worker_address=A, n_gpu=2, replica=3))


def test_memory_estimate_above_free_memory() -> None:
    workers = {a: WorkerView(a, memory_limit=4 * 2**30, memory_used=3 * 2**30) for a in (A, B)}
    r = PlacementRequest.from_launch({"n_gpu": 0}, memory_bytes=2 * 2**30)
    with pytest.raises(InsufficientResourcesError, match="estimated memory 2.00 GiB is above its free memory 1.00 GiB"):
        place_replicas(workers, {}, {}, r)
    workers[B].memory_used = 0
    assert place_replicas(workers, {}, {}, r)[0].address == B
    gpu = {A: WorkerView(A, gpus=2, gpu_free={0: 2**30, 1: 8 * 2**30})}
    r = PlacementRequest.from_launch({"n_gpu": 1}, memory_bytes=4 * 2**30)
    assert place_replicas(gpu, {}, {}, r)[0].gpu_idx == [1]  # the GPU with room, not the first
    with pytest.raises(InsufficientResourcesError, match="per GPU is above the free memory of GPU"):
        place_replicas(gpu, {}, {}, PlacementRequest.from_launch({"gpu_idx": [0]}, memory_bytes=4 * 2**30))


def test_excluded_workers_and_their_reasons() -> None:
    out = place_replicas(cluster(), {}, {}, req(n_gpu=1), excluded={A: "vllm is not installed"})
    assert out[0].address in (B, C)
    with pytest.raises(InsufficientResourcesError, match="vllm is not installed"):
        place_replicas(cluster(), {}, {}, req(worker_address=A), excluded={A: "vllm is not installed"})
