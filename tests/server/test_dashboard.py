"""The live dashboard: request statistics (unit), the page and its data URLs (a real xdask-local serving Gemma)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import pytest
from support.servers import wait_until

from xdask.api.chat import ChatCompletionRequest, CompletionRequest
from xdask.cluster.local import dashboard_address
from xdask.errors import GenerationError, NotFoundError
from xdask_server.dashboard_view import (
    SERIES_COLUMNS,
    build_page,
    color_of,
    header_html,
    replica_rows,
    worker_rows,
)
from xdask_server.serving import OpenAIServing
from xdask_server.stats import RequestStats, Sampler, percentile


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- statistics, without a server ------------------------------------------------------------------------


def _request(stats: RequestStats, clock: FakeClock, uid: str, seconds: float, tokens: int,
             exc: BaseException | None = None) -> None:
    tracker = stats.track(uid, streamed=True)
    clock.now += seconds / 2
    tracker.message({"text": "a", "finish_reason": None, "usage": None})
    clock.now += seconds / 2
    tracker.message({"text": "b", "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": tokens}})
    tracker.finish(exc)


def test_counts_rates_and_latency():
    clock = FakeClock()
    stats = RequestStats(clock=clock)
    sampler = Sampler(stats, interval=1.0, history=3)
    sampler.sample(now=0.0, wall=1000.0)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        _request(stats, clock, "m", seconds, tokens=10)
    _request(stats, clock, "m", 1.0, tokens=2, exc=GenerationError("engine failed"))
    totals = stats.models["m"].totals()
    assert totals["requests_total"] == 5 and totals["errors_total"] == 1 and totals["cancelled_total"] == 0
    assert totals["tokens_total"] == 42 and totals["prompt_tokens_total"] == 25 and totals["in_flight"] == 0
    assert totals["latency_mean"] == pytest.approx(2.0 / 5)

    row = sampler.sample(now=2.0, wall=1002.0)["m"]  # two seconds since the last sample
    assert row["requests_rate"] == pytest.approx(2.5) and row["tokens_rate"] == pytest.approx(21.0)
    assert row["latency_mean"] == pytest.approx(0.4) and row["latency_p95"] == pytest.approx(1.0)
    assert row["ttft_mean"] == pytest.approx(0.2) and row["errors"] == 1 and row["time"] == 1002000.0

    # Nothing new: rates drop to 0 and latency has no value (a gap in the chart, not a fast request).
    row = sampler.sample(now=3.0, wall=1003.0)["m"]
    assert row["requests_rate"] == 0 and row["tokens_rate"] == 0 and row["latency_mean"] is None
    recent = sampler.recent("m")  # over the whole window: 5 requests in 3 s
    assert recent["requests_rate"] == pytest.approx(5 / 3) and recent["latency_p95"] == pytest.approx(1.0)
    sampler.sample(now=4.0, wall=1004.0)
    sampler.sample(now=5.0, wall=1005.0)
    series = sampler.series()["m"]
    assert len(series["time"]) == 3  # history=3 keeps the last three samples
    assert series["time"] == [1003000.0, 1004000.0, 1005000.0]


def test_tokens_count_while_a_stream_runs_and_end_exact():
    clock = FakeClock()
    stats = RequestStats(clock=clock)
    sampler = Sampler(stats, interval=1.0, history=10)
    sampler.sample(now=0.0)
    tracker = stats.track("m", streamed=True)
    for _ in range(3):
        tracker.message({"text": "x", "finish_reason": None, "usage": None})
    assert sampler.sample(now=1.0)["m"]["tokens_rate"] == 3  # one per text message until usage comes
    assert sampler.latest("m")["queue"] == 1
    tracker.message({"text": "", "finish_reason": "stop", "usage": {"prompt_tokens": 4, "completion_tokens": 7}})
    tracker.finish(None)
    assert stats.models["m"].tokens_total == 7
    row = sampler.sample(now=2.0)["m"]
    assert row["tokens_rate"] == 4 and row["queue"] == 0 and row["queue_peak"] == 1


def test_percentile_is_nearest_rank():
    assert percentile([], 0.95) == 0.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0


def test_gone_models_are_dropped_once_idle():
    stats = RequestStats()
    live = {"a", "b"}
    sampler = Sampler(stats, interval=1.0, history=10, live=lambda: live)
    for uid in ("a", "b"):
        stats.track(uid, streamed=False).finish(None)
    busy = stats.track("b", streamed=False)
    sampler.sample()
    live.clear()
    sampler.sample()
    assert set(stats.models) == {"b"}  # "a" is gone and idle; "b" still has a request in flight
    busy.finish(None)
    sampler.sample()
    sampler.sample()
    assert stats.models == {} and sampler.series() == {}


# -- the serving hooks, with a fake supervisor ---------------------------------------------------------------


class FakeSupervisor:
    """Enough of ``Supervisor`` for ``OpenAIServing``: one model ``m`` whose engine says "a b c" slowly."""

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.fail = fail
        self.delay = delay

    @property
    def router(self) -> FakeSupervisor:
        return self  # streams the replica's messages itself

    async def record(self, uid: str) -> dict[str, Any]:
        if uid != "m":
            raise NotFoundError(f"no model {uid}", code="model_not_found")
        return {"model_uid": uid, "spec": {"context_length": 1024}}

    async def stream(self, uid: str, request: dict[str, Any], record: dict[str, Any] | None = None):
        for i, word in enumerate(["a ", "b ", "c"]):
            await asyncio.sleep(self.delay)
            if self.fail and i == 1:
                raise GenerationError("the engine broke")
            last = i == 2
            yield {"text": word, "finish_reason": "stop" if last else None,
                   "usage": {"prompt_tokens": 2, "completion_tokens": 3} if last else None}


def _completion(stream: bool, model: str = "m") -> CompletionRequest:
    return CompletionRequest(model=model, prompt="hi", max_tokens=8, stream=stream)


def _chat(stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=stream)


async def _drain(serving: OpenAIServing, req: Any) -> list[dict[str, Any]]:
    return [chunk async for chunk in serving.stream(req)]


def test_serving_counts_every_ending():
    async def main() -> RequestStats:
        serving = OpenAIServing(FakeSupervisor())
        assert (await serving.complete(_completion(False)))["usage"]["completion_tokens"] == 3
        await serving.complete(_chat(False))
        await _drain(serving, _completion(True))
        await _drain(serving, _chat(True))
        # A client that hangs up mid-stream: the handler closes the generator.
        chunks = serving.stream(_completion(True))
        await anext(chunks)
        assert serving.stats.models["m"].in_flight == 1
        await chunks.aclose()
        # A non-streamed request whose client hangs up: the handler cancels the task.
        slow = OpenAIServing(FakeSupervisor(delay=10), serving.stats)
        task = asyncio.ensure_future(slow.complete(_completion(False)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The engine fails, streamed or not.
        broken = OpenAIServing(FakeSupervisor(fail=True), serving.stats)
        with pytest.raises(GenerationError):
            await broken.complete(_completion(False))
        with pytest.raises(GenerationError):
            await _drain(broken, _completion(True))
        # A model that does not exist leaves no trace.
        with pytest.raises(NotFoundError):
            await serving.complete(_completion(False, model="nope"))
        return serving.stats

    stats = asyncio.run(main())
    assert set(stats.models) == {"m"}
    m = stats.models["m"].totals()
    assert m["requests_total"] == 8 and m["cancelled_total"] == 2 and m["errors_total"] == 2
    assert m["in_flight"] == 0
    assert m["tokens_total"] >= 4 * 3  # four whole answers, plus what the cancelled/failed ones streamed


def test_tracking_costs_microseconds():
    """The hot path is a few counter updates: a request with 20 messages costs well under 50 us."""
    stats = RequestStats()
    msg, last = (
        {"text": "tok", "finish_reason": None, "usage": None},
        {"text": "", "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 20}},
    )
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        with stats.track("m", streamed=True) as tracker:
            for _ in range(19):
                tracker.message(msg)
            tracker.message(last)
    per_request = (time.perf_counter() - started) / n
    assert stats.models["m"].requests_total == n
    assert per_request < 50e-6, f"{per_request * 1e6:.1f} us per request"


# -- the page and its data, without a server ---------------------------------------------------------------


def _data_urls(page: str) -> list[str]:
    return re.findall(r'"data_url":"([^"]*)"', page)


def test_page_is_offline_and_relative():
    page = build_page(poll_ms=1000)
    assert "cdn.bokeh.org" not in page and "Bokeh.set_log_level" in page  # BokehJS itself is in the page
    assert not re.search(r"<script[^>]+src=", page)  # nothing to fetch
    urls = _data_urls(page)
    assert sorted(urls) == ["data/links", "data/models", "data/replicas", "data/series", "data/workers"]
    assert 'href="links/api"' in header_html(None) and "Dask dashboard not running" in header_html(None)
    for name in ("replicas", "models", "workers", "queue", "requests_rate", "tokens_rate", "latency", "gpus",
                 "memory", "header"):
        assert f'"name":"{name}"' in page, name


def test_rows_for_replicas_and_workers():
    records = [{"model_uid": "m", "state": "ready", "spec": {"model_engine": "llama.cpp"},
                "replicas": [{"replica_id": 0, "address": "tcp://w:1", "gpu_idx": [1], "state": "ready",
                              "load": {"outstanding": 2, "in_flight": 3}},
                             {"replica_id": 1, "address": None, "gpu_idx": None, "state": "lost"}]}]
    rows = replica_rows(records)
    assert rows["gpu_idx"] == ["1", "-"] and rows["outstanding"] == [2, 0] and rows["in_flight"] == [3, "-"]
    workers = [{"address": "tcp://w:1", "name": "0", "status": "running", "nthreads": 4,
                "gpus": {"total": 2, "used": [1], "free": [0]}, "memory": {"limit": 2**31, "used": 2**30},
                "models": [{"model_uid": "m", "replica_id": 0}]}]
    rows = worker_rows(workers)
    assert rows["gpus_used"] == [1] and rows["gpus_free"] == [1] and rows["memory_limit"] == [2.0]
    assert rows["replicas"] == ["m/0"] and rows["row"] == [0]
    assert color_of("m") == color_of("m")


def test_dask_dashboard_address_setting():
    assert dashboard_address(None, "127.0.0.1") is None
    assert dashboard_address("", "127.0.0.1") is None
    assert dashboard_address(":0", "127.0.0.1") == "127.0.0.1:0"
    assert dashboard_address(8787, "10.0.0.5") == "10.0.0.5:8787"
    assert dashboard_address("0.0.0.0:8787", "127.0.0.1") == "0.0.0.0:8787"


# -- a real server --------------------------------------------------------------------------------------


def _get(http: httpx.Client, name: str) -> dict[str, list[Any]]:
    resp = http.get(f"/dashboard/data/{name}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _model_row(http: httpx.Client, uid: str) -> dict[str, Any]:
    data = _get(http, "models")
    i = data["model"].index(uid)
    return {k: v[i] for k, v in data.items()}


@pytest.mark.slow
def test_page_is_served_at_a_relative_location(http):
    resp = http.get("/dashboard", follow_redirects=False)
    assert resp.status_code == 302 and resp.headers["location"] == "dashboard/"
    resp = http.get("/dashboard/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert "cdn.bokeh.org" not in page and "Bokeh" in page
    assert all(not u.startswith(("/", "http")) for u in _data_urls(page)) and _data_urls(page)
    again = http.get("/dashboard/", headers={"If-None-Match": resp.headers["etag"]})
    assert again.status_code == 304
    api = http.get("/dashboard/links/api", follow_redirects=False)
    assert api.status_code == 302 and api.headers["location"] == "/v1/models"
    missing = http.get("/dashboard/data/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"]


@pytest.mark.slow
def test_data_follows_real_requests(server, http, default_model):
    before = _model_row(http, default_model)
    chat = {"model": default_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for _ in range(2):
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
    for _ in range(2):
        resp = http.post("/v1/completions", json={"model": default_model, "prompt": "Once", "max_tokens": 4,
                                                  "stream": True})
        assert resp.status_code == 200 and "[DONE]" in resp.text
    body = {"model": default_model, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=server.endpoint, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert any(next(lines).startswith("data:") for _ in range(4))
        assert _model_row(http, default_model)["in_flight"] >= 1
    # The hang-up reaches the server within moments: counted as cancelled, nothing left in flight.
    assert wait_until(lambda: _model_row(http, default_model)["cancelled_total"] > before["cancelled_total"],
                      timeout=15)
    row = _model_row(http, default_model)
    assert row["requests_total"] >= before["requests_total"] + 5
    assert row["tokens_total"] >= before["tokens_total"] + 4 * 2
    assert row["in_flight"] == 0 and row["latency_mean"] > 0 and row["engine"] == "llama.cpp"
    assert wait_until(lambda: _model_row(http, default_model)["requests_rate"] > 0, timeout=5)

    series = _get(http, "series")
    assert set(series) == set(SERIES_COLUMNS)
    i = series["model"].index(default_model)
    assert sum(series["requests"][i]) >= 5 and max(series["tokens_rate"][i]) > 0
    assert any(v for v in series["latency_p95"][i] if v is not None)
    assert len(series["xs"][i]) == len(series["queue"][i])

    workers = http.get("/v1/cluster/workers").json()["data"]
    replicas = _get(http, "replicas")
    j = replicas["model"].index(default_model)
    assert replicas["state"][j] == "ready" and replicas["address"][j] in {w["address"] for w in workers}
    assert wait_until(lambda: _get(http, "replicas")["in_flight"][j] == 0, timeout=10)
    assert sorted(_get(http, "workers")["address"]) == sorted(w["address"] for w in workers)


@pytest.mark.slow
def test_dask_dashboard_link_answers(http):
    links = _get(http, "links")
    url = links["dask_dashboard"][0]
    assert url and url.startswith("http://"), links
    assert httpx.get(url, timeout=30).status_code == 200
    assert json.dumps(url)[1:-1] in links["html"][0] or url in links["html"][0]
