"""Both llama.cpp backends, in-process and behind the server, on the real Gemma GGUF.

Both backends batch concurrent requests into one decode step (xllamacpp's
server slots; our scheduler over llama-cpp-python's batch API); the second
half of this file checks that batching is real and never mixes sequences.

CI sets XDASK_TEST_REQUIRE_BACKENDS=1 so that a backend missing there fails
instead of skipping.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import threading

import pytest
from support.servers import DEFAULT_LAUNCH, wait_until

from xdask.engines.base import Delta, SamplingParams
from xdask.engines.llama_cpp import build_engine, choose_backend
from xdask.engines.llama_cpp.options import LlamaCppOptions
from xdask.errors import EngineUnavailableError, GenerationError, InvalidRequestError
from xdask.hub import locate_model
from xdask.registry import resolve

pytestmark = pytest.mark.slow

MODULES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}


def require(backend: str) -> None:
    if importlib.util.find_spec(MODULES[backend]) is None:
        if os.environ.get("XDASK_TEST_REQUIRE_BACKENDS") == "1":
            pytest.fail(f"{backend} is not installed but CI requires it")
        pytest.skip(f"{backend} is not installed")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> str:
    import dask.config

    with dask.config.set({"xdask.home": str(tmp_path_factory.mktemp("home"))}):
        return str(locate_model(resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")))


@pytest.fixture(scope="module", params=["xllamacpp", "llama-cpp-python"])
def engine(request, gguf_path):
    require(request.param)
    options = LlamaCppOptions(n_ctx=4096, n_parallel=4, n_threads=2, n_gpu_layers=0)
    eng = build_engine(gguf_path, request.param, {"options": options})
    eng.load()
    yield eng
    eng.close()


def run(engine, prompt: str, **params) -> tuple[str, Delta]:
    pieces: list[Delta] = []
    engine.generate(prompt, SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **params}),
                    lambda d: pieces.append(d) or False)
    last = next(d for d in reversed(pieces) if d.finish_reason)
    return "".join(d.text for d in pieces), last


def test_generates_with_usage(engine):
    text, last = run(engine, "1, 2, 3, 4, 5,", max_tokens=6)
    assert text.startswith(" 6")
    assert last.finish_reason == "length"
    assert last.completion_tokens == 6 and last.prompt_tokens >= 10


def test_stop_sequence(engine):
    text, last = run(engine, "1, 2, 3, 4, 5,", max_tokens=16, stop=[","])
    assert text.strip() == "6" and last.finish_reason == "stop"


def test_emit_returning_true_stops_generation(engine):
    seen: list[Delta] = []

    def emit(delta: Delta) -> bool:
        seen.append(delta)
        return len(seen) >= 3

    engine.generate("Once upon a time", SamplingParams(max_tokens=200, temperature=0.0), emit)
    assert 3 <= len(seen) <= 5


def test_concurrent_requests_do_not_corrupt_each_other(engine):
    prompts = [f"{n}, {n + 1}, {n + 2}, {n + 3}," for n in (10, 20, 30, 40, 50, 60)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: run(engine, p, max_tokens=4, stop=[","]), prompts))
    for n, (text, _last) in zip((10, 20, 30, 40, 50, 60), results, strict=True):
        assert text.strip() == str(n + 4)


def test_backend_choice(monkeypatch):
    import dask.config

    installed = [b for b, m in MODULES.items() if importlib.util.find_spec(m)]
    if installed:
        assert choose_backend("auto") == installed[0]
    with pytest.raises(EngineUnavailableError):
        choose_backend("no-such-backend")
    with dask.config.set({"xdask.llama-cpp.backend": "llama-cpp-python"}):
        if "llama-cpp-python" in installed:
            assert choose_backend() == "llama-cpp-python"
        else:
            with pytest.raises(EngineUnavailableError):
                choose_backend()


@pytest.mark.parametrize("backend", ["xllamacpp", "llama-cpp-python"])
def test_server_serves_each_backend(http, backend):
    require(backend)
    uid = f"backend-{backend}"
    resp = http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": uid, "llama_cpp_backend": backend})
    assert resp.status_code == 200, resp.text
    try:
        assert http.get(f"/v1/models/{uid}").json()["engine"]["backend"] == backend
        out = http.post("/v1/completions", json={"model": uid, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 3,
                                                 "temperature": 0}).json()
        assert out["choices"][0]["text"].startswith(" 6")
        assert out["usage"]["completion_tokens"] == 3
        chat = http.post("/v1/chat/completions", json={"model": uid, "max_tokens": 6,
                                                       "messages": [{"role": "user", "content": "Hello"}]}).json()
        assert chat["choices"][0]["message"]["content"]
    finally:
        assert http.delete(f"/v1/models/{uid}").status_code == 200


def test_options_give_every_backend_its_slots():
    import dask.config

    with dask.config.set({"xdask.llama-cpp.n-parallel": 6, "xdask.llama-cpp.n-ctx-per-slot": 1024}):
        opts = LlamaCppOptions.build(32768, {})
        assert (opts.n_parallel, opts.n_ctx) == (6, 6 * 1024)
        kwargs = {"n_parallel": 3}
        assert LlamaCppOptions.build(512, kwargs).n_ctx == 3 * 512 and not kwargs


# -- llama-cpp-python's batching scheduler ---------------------------------------------

STORIES = [f"Write a short story about a {thing}." for thing in
           ("dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock")]


@pytest.fixture(scope="module")
def batched(gguf_path):
    """llama-cpp-python with 8 slots of 512 tokens."""
    require("llama-cpp-python")
    options = LlamaCppOptions(n_ctx=8 * 512, n_parallel=8, n_threads=2, n_gpu_layers=0)
    eng = build_engine(gguf_path, "llama-cpp-python", {"options": options})
    eng.load()
    yield eng
    eng.close()


def test_describe_reports_slots(batched):
    info = batched.describe()
    assert info["backend"] == "llama-cpp-python"
    assert info["n_parallel"] == 8 and info["n_ctx_per_slot"] == 512
    assert info["active_sequences"] == 0


#: Prompts whose greedy continuation is far from any near-tie, each different: a batched decode
#: may round differently from a solo one (llama.cpp's kernels depend on the batch size), which can
#: flip a near-tied token of an open prompt (a story's second word) but never these.
COUNTS = [", ".join(str(n + i) for i in range(6)) + "," for n in (1, 7, 12, 20, 33, 41, 48, 61)]


def test_concurrent_greedy_text_equals_solo_text(batched):
    """Eight sequences decoded in the same batches each get exactly their own greedy answer."""
    solo = [run(batched, p, max_tokens=24)[0] for p in COUNTS]
    assert len(set(solo)) == len(COUNTS)  # eight different answers: cross-talk would show
    steps_before = batched.steps
    batched.max_active = 0
    with concurrent.futures.ThreadPoolExecutor(len(COUNTS)) as pool:
        together = [text for text, _ in pool.map(lambda p: run(batched, p, max_tokens=24), COUNTS)]
    assert together == solo
    assert batched.max_active == len(COUNTS)
    # 8 x 24 tokens took about 24 decode steps, not 8 x 24: the sequences really shared them.
    assert batched.steps - steps_before <= 2 * 24


def test_concurrent_requests_overlap_in_time(batched):
    """While one long request streams, seven more start and finish beside it.

    A serializing engine would finish the long request before any of the
    short ones that arrived after it had started.
    """
    started = threading.Event()
    batched.max_active = 0

    def long_emit(delta: Delta) -> bool:
        started.set()
        return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        long_job = pool.submit(batched.generate, STORIES[0], SamplingParams(max_tokens=128, temperature=0), long_emit)
        assert started.wait(60)
        results = list(pool.map(lambda p: run(batched, p, max_tokens=8), STORIES[1:]))
        assert not long_job.done(), "the short requests waited for the long one"
        long_job.result(timeout=120)
    assert all(last.completion_tokens == 8 for _, last in results)
    assert batched.max_active >= 2


def test_cancel_frees_the_slot(batched):
    """Cancelled sequences give their slots back; three times the slot count still fits."""
    def cancel_after(n: int):
        seen: list[Delta] = []

        def emit(delta: Delta) -> bool:
            seen.append(delta)
            return len(seen) >= n

        return seen, emit

    for _round in range(3):
        cancels = [cancel_after(2) for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: batched.generate(STORIES[1], SamplingParams(max_tokens=200, temperature=0),
                                                     c[1]), cancels))
        assert all(len(seen) == 2 and seen[-1].finish_reason is None for seen, _ in cancels)
    assert wait_until(lambda: batched.active == 0, timeout=30)
    text, last = run(batched, "1, 2, 3, 4, 5,", max_tokens=6)
    assert text.startswith(" 6") and last.completion_tokens == 6
    assert batched.active == 0


def test_stop_string_spanning_tokens(batched):
    text, last = run(batched, "1, 2, 3, 4, 5,", max_tokens=16, stop=[" 8,", "no such stop"])
    assert text == " 6, 7," and last.finish_reason == "stop"


def test_seed_repeats(batched):
    """The same seed draws the same text; other seeds draw other text.

    Only under the same conditions: a batch's company changes a sequence's
    logits in the last bits (llama.cpp's kernels are not batch-invariant),
    enough to move a temperature-1 draw, as in every batching server.
    """
    params = {"max_tokens": 16, "temperature": 1.0, "seed": 1234}
    alone = run(batched, STORIES[2], **params)[0]
    assert run(batched, STORIES[2], **params)[0] == alone
    others = {run(batched, STORIES[2], **{**params, "seed": seed})[0] for seed in (1, 2, 3)}
    assert others != {alone}


def test_penalties_change_greedy_text(batched):
    """OpenAI's penalties count generated tokens: the repeated " 1," soon loses to something else."""
    plain = run(batched, "1, 1, 1, 1, 1, 1,", max_tokens=12)[0]
    penalized = run(batched, "1, 1, 1, 1, 1, 1,", max_tokens=12, presence_penalty=2.0, frequency_penalty=2.0)[0]
    assert plain.startswith(" 1, 1, 1, 1,")
    assert not penalized.startswith(" 1, 1, 1, 1,")


def test_text_is_whole_utf8_characters(batched):
    """Gemma spells hieroglyphs as four byte tokens; no delta may carry half a character."""
    pieces: list[Delta] = []
    batched.generate("\U00013000 \U00013001 \U00013002 \U00013003 \U00013004 \U00013005 \U00013006",
                     SamplingParams(max_tokens=10, temperature=0.0), lambda d: pieces.append(d) or False)
    text = "".join(d.text for d in pieces)
    assert "\U00013007" in text
    assert not any("\ufffd" in d.text for d in pieces)


def test_prompt_longer_than_a_slot_is_a_400(batched):
    with pytest.raises(InvalidRequestError) as info:
        run(batched, "word " * 600)
    assert info.value.status == 400 and "512" in info.value.message
    assert run(batched, "1, 2, 3, 4, 5,", max_tokens=2)[0].startswith(" 6")


def test_generation_stops_at_the_end_of_its_slot(batched):
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 12  # ~360 tokens of the 512 a slot holds
    _text, last = run(batched, prompt, max_tokens=400)
    assert last.finish_reason == "length"
    # Every cell of the slot used, plus the last token sampled (emitted, never decoded).
    assert last.prompt_tokens + last.completion_tokens == 512 + 1


def test_one_slot_serves_requests_in_turn(gguf_path):
    require("llama-cpp-python")
    options = LlamaCppOptions(n_ctx=512, n_parallel=1, n_threads=2, n_gpu_layers=0)
    eng = build_engine(gguf_path, "llama-cpp-python", {"options": options})
    eng.load()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(lambda n: run(eng, f"{n}, {n + 1}, {n + 2},", max_tokens=4, stop=[","])[0],
                                  (10, 20, 30)))
        assert [t.strip() for t in texts] == ["13", "23", "33"]
        assert eng.max_active == 1
    finally:
        eng.close()


def test_a_failed_decode_fails_its_requests_only(gguf_path):
    """llama_decode failing is a 500 for the requests in that batch; the engine goes on."""
    require("llama-cpp-python")
    options = LlamaCppOptions(n_ctx=2 * 512, n_parallel=2, n_threads=2, n_gpu_layers=0)
    eng = build_engine(gguf_path, "llama-cpp-python", {"options": options})
    eng.load()
    real = eng._lib

    class FailingDecode:
        def __getattr__(self, name):
            return getattr(real, name)

        def llama_decode(self, ctx, batch):
            return -1

    try:
        eng._lib = FailingDecode()
        with pytest.raises(GenerationError, match="llama_decode returned -1"):
            run(eng, "1, 2, 3,")
        eng._lib = real
        assert eng.active == 0
        assert run(eng, "1, 2, 3, 4, 5,", max_tokens=2)[0].startswith(" 6")
    finally:
        eng._lib = real
        eng.close()


def test_close_fails_pending_requests(gguf_path):
    require("llama-cpp-python")
    options = LlamaCppOptions(n_ctx=2 * 512, n_parallel=2, n_threads=2, n_gpu_layers=0)
    eng = build_engine(gguf_path, "llama-cpp-python", {"options": options})
    eng.load()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(run, eng, p, max_tokens=400) for p in STORIES[:4]]
        assert wait_until(lambda: eng.active == 2, timeout=60)
        eng.close()
        for job in jobs:
            with pytest.raises(GenerationError):
                job.result(timeout=60)
    with pytest.raises(GenerationError):
        run(eng, "1, 2, 3,")
    eng.close()  # twice is harmless
