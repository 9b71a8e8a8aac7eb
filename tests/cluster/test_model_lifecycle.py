"""Launch, describe, terminate: the actor really leaves the worker and frees memory."""

from __future__ import annotations

import sys

import cloudpickle
import pytest
from support.servers import DEFAULT_LAUNCH, wait_until

pytestmark = pytest.mark.slow
# The probes below run inside the workers, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _actors(dask_worker) -> list[str]:
    return list(dask_worker.state.actors)


def _rss(dask_worker) -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _worker_actors(dask_client) -> list[str]:
    return [k for keys in dask_client.run(_actors).values() for k in keys]


def test_registry_is_shared_with_any_dask_client(dask_client, default_model):
    """A second process (this test's Dask client) reads the same registry on the scheduler."""

    async def models(dask_scheduler):
        return [r["model_uid"] for r in dask_scheduler.handlers["xdask_models"]()]

    assert default_model in dask_client.run_on_scheduler(models)


def test_terminate_removes_the_actor_and_frees_memory(http, dask_client, default_model):
    rss_before = sum(dask_client.run(_rss).values())
    resp = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "to-stop"})
    assert resp.status_code == 200, resp.text
    record = http.get("/v1/models/to-stop").json()
    keys = [k for k in _worker_actors(dask_client) if "to-stop" in k]
    assert len(keys) == 1
    rss_loaded = sum(dask_client.run(_rss).values())
    answer = http.post("/v1/completions", json={"model": "to-stop", "prompt": "Hello", "max_tokens": 4})
    assert answer.status_code == 200

    resp = http.delete("/v1/models/to-stop")
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    assert wait_until(lambda: not any("to-stop" in k for k in _worker_actors(dask_client)), timeout=20)
    assert "to-stop" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.get("/v1/models/to-stop").status_code == 404
    rss_after = sum(dask_client.run(_rss).values())
    # The GGUF is ~250 MB: loading grows the worker, terminating gives most of it back.
    assert rss_loaded - rss_before > 100e6, (rss_before, rss_loaded)
    assert rss_loaded - rss_after > 0.6 * (rss_loaded - rss_before), (rss_before, rss_loaded, rss_after)
    assert record["address"].startswith("tcp://")
    # The other model is untouched.
    assert (
        http.post("/v1/completions", json={"model": default_model, "prompt": "Hi", "max_tokens": 2}).status_code
        == 200
    )


def test_launch_errors(http, default_model):
    unknown = http.post("/v1/models", json={"model_name": "no-such-family"})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "model_not_registered"
    wrong_quant = http.post("/v1/models", json={**DEFAULT_LAUNCH, "quantization": "Q9_Z"})
    assert wrong_quant.status_code == 400
    wrong_engine = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_engine": "no-engine"})
    assert wrong_engine.status_code == 400
    taken = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": default_model})
    assert taken.status_code == 409
    bad_uid = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "../etc"})
    assert bad_uid.status_code == 400
    missing = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "ghost", "model_path": "/no/such.gguf"})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    assert missing.json()["error"]["code"] == "model_path_not_found"
    # A failed launch leaves nothing behind.
    assert "ghost" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.delete("/v1/models/ghost").status_code == 404


def test_registrations(http):
    items = http.get("/v1/model_registrations/LLM").json()
    assert {"model_name": "gemma-3-270m", "is_builtin": True} in items
    one = http.get("/v1/model_registrations/LLM/gemma-3-270m").json()
    assert one["model_specs"][0]["quantizations"] == ["Q4_K_M"]
    assert http.get("/v1/model_registrations/LLM/nope").status_code == 404
    assert http.get("/v1/model_registrations/nonsense").status_code == 400


def test_embedded_workers_run_with_quiet_dask_timers(dask_client) -> None:
    """xdask.local.dask-config reaches the worker processes through their nanny.

    Dask's profiler and fast timers cost decode speed on small machines (README
    benchmark); a worker that did not get the settings would silently be slower.
    """
    import dask.config

    from xdask import config

    wanted = dict(config.get("local.dask-config"))
    seen = dask_client.run(lambda: {key: dask.config.get(key) for key in wanted})
    assert seen, "no workers"
    for worker, values in seen.items():
        assert values == wanted, worker
    assert dask_client.run_on_scheduler(lambda: dask.config.get("distributed.admin.tick.interval")) == "1s"
    # Dask's nanny would set these for the worker; an engine needs its threads and glibc's own trimming.
    leaked = dask_client.run(lambda: {k: v for k, v in __import__("os").environ.items()
                                      if k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    assert all(not env for env in leaked.values()), leaked
