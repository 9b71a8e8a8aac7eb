"""A client that hangs up mid-stream stops the generation on the worker."""

from __future__ import annotations

import sys
import time

import cloudpickle
import httpx
import pytest
from support.servers import wait_until

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _busy(dask_worker, uid: str) -> dict:
    actor = next(a for k, a in dask_worker.state.actors.items() if f"xdask-model-{uid}-" in k)
    return {"in_flight": actor._in_flight, "generating": actor._generating}


def _busy_now(dask_client, uid: str) -> dict:
    states = [s for s in dask_client.run(_busy, uid=uid, on_error="return").values() if isinstance(s, dict)]
    return states[0]


@pytest.mark.parametrize("stream", [True, False])
def test_hanging_up_cancels_generation(server, default_model, dask_client, stream):
    body = {"model": default_model, "prompt": "Once upon a time", "max_tokens": 1500,
            "temperature": 1.0, "stream": stream}
    with httpx.Client(base_url=server.endpoint, timeout=5) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data:") for line in got)
                assert _busy_now(dask_client, default_model)["generating"] == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=2)
    hung_up = time.monotonic()
    # 1500 tokens take over 20 s here; a cancelled request ends within a few tokens.
    assert wait_until(lambda: _busy_now(dask_client, default_model) == {"in_flight": 0, "generating": 0},
                      timeout=10)
    assert time.monotonic() - hung_up < 10
    ok = httpx.post(f"{server.endpoint}/v1/completions", json={"model": default_model, "prompt": "Hi", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200
