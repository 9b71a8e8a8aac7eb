"""``xdask.engines.batching.DynamicBatcher`` with real threads (no model: a run function that records its calls)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from xdask.engines.batching import DynamicBatcher
from xdask.errors import ModelNotReadyError


class Recorder:
    """A stand-in model: doubles its items, takes ``delay`` seconds per call, remembers each call's size."""

    def __init__(self, delay: float = 0.0, fail_on: object = None):
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[int] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(len(items))
        time.sleep(self.delay)
        if self.fail_on in items:
            raise RuntimeError("the model failed")
        return [x * 2 for x in items]


def test_concurrent_calls_share_model_calls_and_get_their_own_results():
    model = Recorder(delay=0.02)
    batcher = DynamicBatcher(model, max_items=64, wait=0.005, name="t")
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: batcher.submit([i, i + 1000]), range(64)))
    finally:
        batcher.close()
    assert results == [[2 * i, 2 * (i + 1000)] for i in range(64)]
    assert sum(model.calls) == 128 and len(model.calls) < 16  # batched: far fewer calls than requests
    assert max(model.calls) <= 64
    assert batcher.stats()["batches"] == len(model.calls)


def test_a_lone_caller_is_not_delayed_by_the_wait():
    model = Recorder()
    batcher = DynamicBatcher(model, max_items=64, wait=0.2, name="t")
    try:
        start = time.perf_counter()
        for i in range(5):
            assert batcher.submit([i]) == [2 * i]
        assert time.perf_counter() - start < 0.2  # five calls, not five waits of 0.2 s
    finally:
        batcher.close()


def test_max_items_splits_batches_and_a_large_call_runs_alone():
    model = Recorder(delay=0.05)
    batcher = DynamicBatcher(model, max_items=10, wait=0.01, name="t")
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(batcher.submit, [i] * 4) for i in range(6)]
            big = pool.submit(batcher.submit, list(range(25)))
            assert [f.result() for f in futures] == [[2 * i] * 4 for i in range(6)]
            assert big.result() == [2 * x for x in range(25)]
    finally:
        batcher.close()
    assert 25 in model.calls and all(n <= 10 for n in model.calls if n != 25)


def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs():
    model = Recorder(fail_on=-1)
    batcher = DynamicBatcher(model, max_items=64, wait=0.0, name="t")
    try:
        with pytest.raises(RuntimeError, match="the model failed"):
            batcher.submit([1, -1])
        assert batcher.submit([3]) == [6]
    finally:
        batcher.close()


def test_close_fails_queued_calls_and_refuses_new_ones():
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    batcher = DynamicBatcher(slow, max_items=1, wait=0.0, name="t")
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(batcher.submit, [1])
        time.sleep(0.1)  # the first call is inside the model
        queued = pool.submit(batcher.submit, [2])
        time.sleep(0.1)
        closer = threading.Thread(target=batcher.close)
        closer.start()
        with pytest.raises(ModelNotReadyError):
            queued.result(5)
        gate.set()
        assert running.result(5) == [1]  # the batch in the model finishes
        closer.join(5)
    with pytest.raises(ModelNotReadyError):
        batcher.submit([3])
