"""``ModelHandle.chat_batch`` / ``generate_batch``: Dask futures of chunk tasks against the real default model.

No mocks: the session's ``xdask-local`` and its Gemma 3 270M (16 llama.cpp
slots) answer every item, and a separate cluster of real processes loses a
worker (``kill -9``) in the middle of a batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import distributed
import pytest
from support.cluster_procs import ProcCluster, kill_worker
from support.servers import DEFAULT_LAUNCH, wait_until

from xdask import Client
from xdask.batch import BatchFutures
from xdask.errors import InvalidRequestError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xclient(server) -> Iterator[Client]:
    with Client(server.endpoint) as client:
        yield client


@pytest.fixture(scope="module")
def model(xclient: Client, default_model: str):
    return xclient.get_model(default_model)


def _prompt(i: int) -> str:
    """Prompt ``i``: its length (so its token count) grows with ``i % 10``, an order we can check."""
    return "Say" + " la" * (i % 10)


def test_thousand_prompts_in_order_with_flat_memory(model, dask_client) -> None:
    def rss() -> int:  # defined here so that cloudpickle ships it by value to the worker
        import psutil

        return psutil.Process().memory_info().rss

    n = 1000
    prompts = [_prompt(i) for i in range(n)]
    # Warm up: every prompt length in every slot, with as many requests in flight as the batch will have,
    # so that the engine's buffers, the KV pages they touch and the actor's threads exist before measuring.
    warm = model.chat_batch(prompts[:128], max_tokens=2, temperature=0).results()
    assert all(o["error"] is None for o in warm)
    before = dask_client.run(rss)

    started = time.monotonic()
    batch = model.chat_batch(prompts, max_tokens=2, temperature=0)
    assert isinstance(batch, BatchFutures) and len(batch) == len(batch.sizes) > 10  # chunks, not one task
    assert all(f.key[0].startswith(f"xdask-chat-{model.uid}-") for f in batch)  # one prefix: one progress bar
    seen = []
    while True:
        p = batch.progress()
        seen.append(p["done"])
        if p["chunks_done"] + p["chunks_failed"] == p["chunks"]:
            break
        time.sleep(0.2)
    outcomes = batch.results()
    elapsed = time.monotonic() - started
    after = dask_client.run(rss)

    assert p == {"items": n, "done": n, "chunks": len(batch), "chunks_done": len(batch), "chunks_failed": 0}
    assert seen == sorted(seen) and len({d for d in seen if 0 < d < n}) >= 2, seen  # it moved, in steps
    assert len(outcomes) == n
    bad = [(i, o["error"]) for i, o in enumerate(outcomes) if o["error"] is not None]
    assert not bad, bad[:5]
    for o in outcomes:
        r = o["response"]
        assert r["object"] == "chat.completion" and r["model"] == model.uid
        assert r["usage"]["completion_tokens"] >= 1 and isinstance(r["choices"][0]["message"]["content"], str)
    # Each outcome sits at its prompt's index: prompt tokens depend on i % 10 only, and grow with it.
    by_len: dict[int, set[int]] = {}
    for i, o in enumerate(outcomes):
        by_len.setdefault(i % 10, set()).add(o["response"]["usage"]["prompt_tokens"])
    assert all(len(v) == 1 for v in by_len.values()), by_len
    lengths = [by_len[k].pop() for k in range(10)]
    assert lengths == sorted(set(lengths)), lengths
    assert batch.answers() == [o["response"]["choices"][0]["message"]["content"] for o in outcomes]
    growth = {w: (after[w] - before[w]) / 2**20 for w in before}
    print(f"\n{n} chat items (max_tokens=2) in {elapsed:.1f} s = {n / elapsed:.1f} items/s; "
          f"{len(batch)} chunks; worker RSS growth MiB: {growth}")
    assert all(g < 40 for g in growth.values()), growth

    # Dask's own tools take the batch as it is: a list of chunk futures.
    done, not_done = distributed.wait(batch, timeout=30)
    assert len(done) == len(batch) and not not_done
    assert [o for chunk in batch.client.gather(batch.futures) for o in chunk] == outcomes
    distributed.progress(batch)  # the bar (text here) ends at once: all done
    assert {f.key for f in distributed.as_completed(batch)} == {f.key for f in batch}
    pairs = list(batch.as_completed())
    assert sorted(i for i, _ in pairs) == list(range(n))
    assert all(outcomes[i] == o for i, o in pairs)


def test_bad_item_is_an_error_row(model) -> None:
    items = ["Say la", [{"role": "robot", "content": "hi"}], "Say la la", 42, [{"role": "user", "content": "hi"}]]
    batch = model.chat_batch(items, max_tokens=2, chunk_size=2)
    outcomes = batch.results()
    assert [o["error"] is None for o in outcomes] == [True, False, True, False, True]
    err = outcomes[1]["error"]
    assert err["status"] == 400 and err["type"] == "invalid_request_error" and "role" in err["message"]
    assert outcomes[3]["error"]["param"] == "messages"
    answers = batch.answers()
    assert answers[1] is None and answers[3] is None and all(isinstance(answers[i], str) for i in (0, 2, 4))
    # Completions too, with a whole body as one item.
    gen = model.generate_batch(["1, 2, 3,", {"prompt": "a, b, c,", "max_tokens": 3}, {"prompt": 7}], max_tokens=2)
    outs = gen.results()
    assert outs[0]["response"]["object"] == "text_completion"
    assert outs[0]["response"]["usage"]["completion_tokens"] <= 2 and outs[1]["error"] is None
    assert outs[2]["error"]["status"] == 400


def test_bad_parameter_raises_before_submitting(model, xclient: Client) -> None:
    dask = xclient.dask_client()
    before = set(dask.futures)
    with pytest.raises(InvalidRequestError, match="temperature"):
        model.chat_batch(["Say la"] * 100, temperature=5)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        model.generate_batch(["1, 2,"], max_tokens=0)
    assert set(dask.futures) <= before  # nothing was submitted
    assert xclient.dask_client() is dask  # made once


# -- a replica lost mid-batch -----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcCluster]:
    home: Path = tmp_path_factory.mktemp("batch-cluster-home")
    # One decode thread and four slots per replica: two replicas share this machine's two cores.
    env = {"XDASK_LLAMA_CPP_N_THREADS": "1", "XDASK_LLAMA_CPP_N_PARALLEL": "4",
           "XDASK_BATCH__RETRY_BACKOFF": "0.5"}
    procs = ProcCluster(home, n_workers=2, gpus=1, env=env)
    yield procs
    procs.close()


def test_batch_survives_a_killed_worker(cluster: ProcCluster) -> None:
    with Client(cluster.endpoint) as client:
        uid = client.launch_model(**DEFAULT_LAUNCH, model_uid="batch-ha", replica=2, n_gpu=1)
        model = client.get_model(uid)
        replicas = model.describe()["replicas"]
        assert len({r["address"] for r in replicas}) == 2
        victim = replicas[0]["address"]
        n = 200
        batch = model.generate_batch([f"{i}, {i + 1}," for i in range(n)], max_tokens=4, temperature=0,
                                     retries=6)
        assert wait_until(lambda: batch.progress()["done"] >= n // 5, 240, 0.1), batch.progress()
        done_at_kill = batch.progress()["done"]
        assert done_at_kill < n * 0.8, "the batch finished before the kill: nothing was tested"
        kill_worker(cluster.scheduler_address, victim)
        outcomes = batch.results()
        history = [h["event"] for h in model.describe()["history"]]
        print(f"\nkilled {victim} at {done_at_kill}/{n} items done; items per attempt count: "
              f"{ {a: sum(o['attempts'] == a for o in outcomes) for a in sorted({o['attempts'] for o in outcomes})} }; "
              f"model history: {history}")
        assert "lost" in history  # the replica really went away mid-batch
        bad = [(i, o["error"]) for i, o in enumerate(outcomes) if o["error"] is not None]
        assert not bad, (bad[:5], cluster.logs())
        assert len(outcomes) == n and all(o["response"]["usage"]["completion_tokens"] >= 1 for o in outcomes)
        # Each answer belongs to its prompt: the prompt's tokens match a direct request for it.
        for i in (0, n // 2, n - 1):
            direct = model.generate(f"{i}, {i + 1},", max_tokens=1)
            assert direct["usage"]["prompt_tokens"] == outcomes[i]["response"]["usage"]["prompt_tokens"]
        client.terminate_model(uid)
