"""The SGLang engine adapter: its async bridge, options and SGLang mappings here; the engine on CUDA.

Three parts:

* ``AsyncLoopThread`` (``xdask.engines.async_bridge``), for real: a loop in
  its own thread driven from many caller threads. It needs no SGLang.
* ``SGLangOptions`` and the pure mappings of ``xdask.engines.sglang_engine``
  (sampling params, finish reasons, ``meta_info``, streamed items, errors,
  tokenizer facts). The payloads they are fed are the shapes SGLang's own
  source produces, taken from sgl-project/sglang ``main`` (commit 001067ff):
  ``managers/tokenizer_manager.py`` (``_handle_batch_output``: streamed
  ``{"text", "output_ids", "meta_info"}`` with ``meta_info`` keys ``id``,
  ``finish_reason``, ``prompt_tokens``, ``completion_tokens``,
  ``cached_tokens``...; cumulative ``text`` unless
  ``incremental_streaming_output``; ``_validate_one_request``'s ValueErrors),
  ``managers/schedule_batch.py`` (``FINISH_MATCHED_TOKEN/STR``,
  ``FINISH_LENGTH``, ``FINISH_ABORT.to_json()``; ``Req.set_finish_with_abort``
  uses status 400 and "BadRequestError"), ``managers/utils.py``
  (``validate_input_length``'s message), ``managers/detokenizer_manager.py``
  (a stop string spanning two pieces is trimmed only after its first part
  was sent) and ``sampling/sampling_params.py`` (``verify()``'s messages).
* The engine itself on the tiny random Qwen2, which needs ``sglang`` and a
  CUDA device: SGLang has no CPU build on PyPI, so these tests skip
  elsewhere. CI on a CUDA machine sets XDASK_TEST_REQUIRE_ENGINES=sglang (a
  comma list) so that they fail instead of skipping. SGLang is never faked.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from support.engine_checks import PROMPTS, hf_greedy, load_hf, run
from support.servers import engine_required

from xdask.engines.async_bridge import AsyncLoopThread
from xdask.engines.base import Delta, Engine, SamplingParams
from xdask.engines.sglang_engine import (
    DEFAULT_MAX_CONCURRENCY,
    ChunkDecoder,
    SGLangOptions,
    abort_error,
    build_engine,
    check_sampling_params,
    effective_context_length,
    error_from_exception,
    finish_reason_of,
    read_hf_config,
    to_sglang_sampling_params,
    tokenizer_facts,
    usage_of,
)
from xdask.errors import (
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotReadyError,
)

SKIP_REASON = "SGLang has no CPU build on PyPI; runs only on CUDA machines"


# == AsyncLoopThread ======================================================================


@pytest.fixture
def bridge():
    b = AsyncLoopThread("test-bridge")
    b.start()
    yield b
    b.stop()


def test_bridge_starts_runs_and_stops():
    b = AsyncLoopThread("lifecycle")
    assert not b.running
    b.start()
    assert b.running and not b.in_loop_thread()
    with pytest.raises(RuntimeError):
        b.start()

    async def where() -> tuple[str, asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return threading.current_thread().name, asyncio.get_running_loop()

    name, loop = b.run(where()).result(timeout=5)
    assert name == "lifecycle" and loop is b.loop
    assert b.call(b.in_loop_thread).result(timeout=5) is True
    b.stop()
    assert not b.running
    assert "lifecycle" not in {t.name for t in threading.enumerate()}
    assert b.loop.is_closed()
    b.stop()  # idempotent


def test_bridge_serves_many_caller_threads(bridge):
    loops: set[int] = set()
    threads_seen: set[str] = set()
    results: dict[tuple[int, int], int] = {}
    errors: list[BaseException] = []

    async def square(x: int) -> int:
        loops.add(id(asyncio.get_running_loop()))
        threads_seen.add(threading.current_thread().name)
        await asyncio.sleep(0.001)
        return x * x

    def caller(i: int) -> None:
        try:
            futures = {(i, j): bridge.run(square(i * 100 + j)) for j in range(20)}
            for key, fut in futures.items():
                results[key] = fut.result(timeout=10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == {(i, j): (i * 100 + j) ** 2 for i in range(16) for j in range(20)}
    assert loops == {id(bridge.loop)} and threads_seen == {"test-bridge"}


def test_bridge_propagates_exceptions(bridge):
    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        bridge.run(fail()).result(timeout=5)

    def plain_fail() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        bridge.call(plain_fail).result(timeout=5)
    # The loop survives its callers' errors.
    assert bridge.call(sum, [1, 2, 3]).result(timeout=5) == 6


def test_cancelling_a_future_cancels_its_coroutine(bridge):
    started, cleaned = threading.Event(), threading.Event()

    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    fut = bridge.run(wait_forever())
    assert started.wait(5)
    fut.cancel()
    assert cleaned.wait(5)
    assert fut.cancelled()


def test_stop_cancels_pending_work():
    b = AsyncLoopThread("stopper")
    b.start()
    started, cleaned = threading.Event(), threading.Event()

    async def long_job() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleaned.set()
            raise

    futures = [b.run(long_job()) for _ in range(5)]
    assert started.wait(5)
    t0 = time.monotonic()
    b.stop(timeout=5)
    assert time.monotonic() - t0 < 5
    assert cleaned.is_set()
    assert all(f.cancelled() for f in futures)


def test_stop_fails_work_that_ignores_cancellation():
    b = AsyncLoopThread("stubborn")
    b.start()
    started = threading.Event()

    async def stubborn() -> None:
        started.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # refuses to stop

    fut = b.run(stubborn())
    assert started.wait(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Task was destroyed but it is pending"
        b.stop(timeout=0.5)
    # Its caller is told instead of waiting forever.
    with pytest.raises(RuntimeError, match="stopped"):
        fut.result(timeout=5)
    assert "stubborn" not in {t.name for t in threading.enumerate()}


def test_run_after_stop_is_refused_without_leaking_a_coroutine():
    b = AsyncLoopThread("closed")
    b.start()
    b.stop()

    async def never() -> None:  # pragma: no cover - must not run
        raise AssertionError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coro = never()
        with pytest.raises(RuntimeError, match="not running"):
            b.run(coro)
        del coro
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    with pytest.raises(RuntimeError):
        b.call_soon(print)
    never_started = AsyncLoopThread("never-started")
    with pytest.raises(RuntimeError):
        never_started.run(asyncio.sleep(0))
    never_started.stop()  # nothing to stop


def test_stop_from_the_loop_thread_is_refused(bridge):
    with pytest.raises(RuntimeError, match="own thread"):
        bridge.call(bridge.stop).result(timeout=5)
    assert bridge.running


def test_objects_created_with_call_adopt_the_private_loop(bridge):
    """SGLang's Engine (and vLLM's AsyncLLM) bind to the loop running where they are created."""

    class AsyncClient:
        def __init__(self) -> None:
            self.loop = asyncio.get_running_loop()
            self.lock = asyncio.Lock()

        async def ping(self) -> bool:
            async with self.lock:
                return asyncio.get_running_loop() is self.loop

    client = bridge.call(AsyncClient).result(timeout=5)
    assert client.loop is bridge.loop
    assert all(f.result(timeout=5) for f in [bridge.run(client.ping()) for _ in range(10)])


def test_call_soon_runs_on_the_loop(bridge):
    ran = threading.Event()
    where: list[bool] = []

    def mark() -> None:
        where.append(bridge.in_loop_thread())
        ran.set()

    bridge.call_soon(mark)
    assert ran.wait(5) and where == [True]


# == SGLangOptions and make_engine ===========================================================


def test_options_pass_through_what_is_set():
    opts = SGLangOptions.from_kwargs(
        "sglang",
        {"tp_size": "2", "mem_fraction_static": 0.7, "dtype": "bfloat16", "server_args": {"enable_mixed_chunk": True}},
    )
    assert opts.engine_kwargs() == {
        "mem_fraction_static": 0.7,
        "tp_size": 2,
        "dtype": "bfloat16",
        "enable_mixed_chunk": True,
    }
    assert SGLangOptions.from_kwargs("sglang", {}).engine_kwargs() == {}


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"tp_sise": 2}, "unknown option 'tp_sise'"),
        ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
        ({"mem_fraction_static": 0}, "mem_fraction_static"),
        ({"max_running_requests": 0}, "max_running_requests"),
        ({"dtype": "fp7"}, "dtype"),
        ({"chunked_prefill_size": -2}, "chunked_prefill_size"),
        ({"server_args": {"tp_size": 2}}, "tp_size cannot be set here"),
        ({"server_args": {"skip_tokenizer_init": True}}, "skip_tokenizer_init cannot be set here"),
        ({"server_args": {"incremental_streaming_output": False}}, "incremental_streaming_output"),
        ({"server_args": "tp_size=2"}, "server_args"),
    ],
)
def test_bad_options_are_a_400_listing_the_accepted_ones(kwargs, fragment):
    with pytest.raises(InvalidRequestError) as info:
        SGLangOptions.from_kwargs("sglang", kwargs)
    err = info.value
    assert err.status == 400 and err.code == "invalid_engine_option" and err.param == "engine_kwargs"
    assert fragment in err.message
    assert "mem_fraction_static" in err.message and "max_running_requests" in err.message  # the accepted list


def test_make_engine_validates_without_importing_sglang(tmp_path):
    had_sglang = "sglang" in sys.modules
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}')
    eng = build_engine(str(tmp_path), 32768, {"max_running_requests": 12})
    assert eng.name == "sglang"
    assert eng.max_concurrency == 12
    assert eng.context_length == 2048  # the family's, capped by the model's
    if not had_sglang:
        assert "sglang" not in sys.modules
    assert build_engine(str(tmp_path), 1024, {}).context_length == 1024
    assert build_engine(str(tmp_path), 1024, {"context_length": 1500}).context_length == 1500
    with pytest.raises(InvalidRequestError):
        build_engine(str(tmp_path), 1024, {"n_ctx": 4096})
    facts = build_engine(str(tmp_path), 1024, {"tp_size": 2}).describe()
    assert facts["engine"] == "sglang" and facts["tp_size"] == 2 and facts["context_length"] == 1024


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="checks the machine without sglang")
def test_load_without_sglang_is_a_model_load_error(tmp_path):
    eng = build_engine(str(tmp_path), 2048, {})
    with pytest.raises(ModelLoadError, match="pip install sglang"):
        eng.load()
    # Its loop thread is gone and the process slot is free again.
    assert not [t for t in threading.enumerate() if t.name.startswith("xdask-sglang-")]
    with pytest.raises(ModelLoadError, match="pip install sglang"):
        build_engine(str(tmp_path), 2048, {}).load()
    with pytest.raises(GenerationError, match="closed"):
        eng.generate("Hi", SamplingParams(max_tokens=2), lambda d: False)
    eng.close()  # closing an engine that never loaded is a no-op


def test_max_concurrency_default_and_config(tmp_path):
    import dask.config

    assert build_engine(str(tmp_path), 2048, {}).max_concurrency == DEFAULT_MAX_CONCURRENCY
    with dask.config.set({"xdask.sglang.max-concurrency": 64}):
        assert build_engine(str(tmp_path), 2048, {}).max_concurrency == 64
        assert build_engine(str(tmp_path), 2048, {"max_running_requests": 8}).max_concurrency == 8


def test_context_length_rules(tmp_path):
    assert effective_context_length(None, 32768, {"max_position_embeddings": 4096}) == 4096
    assert effective_context_length(None, 2048, {"max_position_embeddings": 4096}) == 2048
    assert effective_context_length(8192, 2048, {"max_position_embeddings": 4096}) == 8192  # explicit wins
    # A multimodal config keeps the language model's limit in text_config.
    assert effective_context_length(None, 32768, {"text_config": {"max_position_embeddings": 8192}}) == 8192
    assert effective_context_length(None, 32768, {}) is None  # unknown model limit: SGLang decides
    assert read_hf_config(str(tmp_path / "missing")) == {}
    (tmp_path / "config.json").write_text("not json")
    assert read_hf_config(str(tmp_path)) == {}


# == sampling params ========================================================================


def test_sampling_params_use_sglang_names():
    sp = to_sglang_sampling_params(
        SamplingParams(max_tokens=7, temperature=0.3, top_p=0.9, stop=["\n\n", "END"], seed=42,
                       presence_penalty=0.5, frequency_penalty=-0.25)
    )
    assert sp == {
        "max_new_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "sampling_seed": 42,
        "stop": ["\n\n", "END"],
    }


def test_sampling_defaults_follow_openai():
    assert to_sglang_sampling_params(SamplingParams(max_tokens=3)) == {"max_new_tokens": 3, "temperature": 1.0}
    # 0 stays 0: SGLang makes that greedy (top_k = 1) itself.
    assert to_sglang_sampling_params(SamplingParams(max_tokens=3, temperature=0.0))["temperature"] == 0.0


def test_sampling_params_an_old_sglang_lacks_are_dropped(caplog):
    # SGLang before ``sampling_seed`` existed: SamplingParams(**kwargs) would raise a TypeError per request.
    older = frozenset({"max_new_tokens", "temperature", "top_p", "stop", "presence_penalty", "frequency_penalty"})
    with caplog.at_level(logging.WARNING, logger="xdask.engines.sglang_engine"):
        sp = to_sglang_sampling_params(SamplingParams(max_tokens=3, seed=1), older)
    assert "sampling_seed" not in sp and sp["max_new_tokens"] == 3
    assert "sampling_seed" in caplog.text


@pytest.mark.parametrize(
    "params,name",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ],
)
def test_out_of_range_sampling_is_a_400_naming_the_parameter(params, name):
    with pytest.raises(InvalidRequestError) as info:
        check_sampling_params(SamplingParams(**{"max_tokens": 4, **params}))
    assert info.value.param == name


def test_in_range_sampling_passes():
    check_sampling_params(SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, presence_penalty=-2.0,
                                         frequency_penalty=2.0))


# == meta_info and finish reasons =============================================================

# meta_info of a streamed item as TokenizerManager._handle_batch_output builds it.
RUNNING = {"id": "r1", "finish_reason": None, "prompt_tokens": 5, "weight_version": "default",
           "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": 2, "cached_tokens": 0}
EOS = {"type": "stop", "matched": 151645}  # FINISH_MATCHED_TOKEN
STOP_STR = {"type": "stop", "matched": "\n\n"}  # FINISH_MATCHED_STR
LENGTH = {"type": "length", "length": 16}  # FINISH_LENGTH
TOO_LONG = {  # Req.set_finish_with_abort(validate_input_length(...)), scheduler side
    "type": "abort",
    "message": "Input length (4100 tokens) exceeds the maximum allowed length (2048 tokens). "
    "Use a shorter input or enable --allow-auto-truncate.",
    "status_code": 400,
    "err_type": "BadRequestError",
}


def meta(finish=None, **counts):
    return {**RUNNING, "finish_reason": finish, **counts}


@pytest.mark.parametrize(
    "reason,expected",
    [(None, None), (EOS, "stop"), (STOP_STR, "stop"), (LENGTH, "length"), (TOO_LONG, "abort"),
     ({"type": "abort"}, "abort"), ("length", "length")],  # the last: a plain string, as very old versions sent
)
def test_finish_reason_types(reason, expected):
    assert finish_reason_of(meta(reason)) == expected


def test_usage_from_meta_info():
    assert usage_of(meta(LENGTH, prompt_tokens=9, completion_tokens=16)) == (9, 16)
    assert usage_of({}) == (None, None)


# == streamed items -> Deltas =================================================================


def feed_all(decoder: ChunkDecoder, items: list[dict]) -> list[Delta]:
    out = []
    for item in items:
        delta = decoder.feed(item)
        if delta is not None:
            out.append(delta)
    return out


def test_cumulative_text_becomes_deltas():
    items = [
        {"text": "Hel", "output_ids": [1], "meta_info": meta(completion_tokens=1)},
        {"text": "Hel", "output_ids": [1, 2], "meta_info": meta(completion_tokens=2)},  # an incomplete character
        {"text": "Hello wor", "output_ids": [1, 2, 3], "meta_info": meta(completion_tokens=3)},
        {"text": "Hello world", "output_ids": [1, 2, 3, 4], "meta_info": meta(LENGTH, completion_tokens=4)},
    ]
    dec = ChunkDecoder(stop=[], incremental=False)
    deltas = feed_all(dec, items)
    assert [d.text for d in deltas] == ["Hel", "lo wor", "ld"]
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert (deltas[-1].finish_reason, deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == ("length", 5, 4)
    assert dec.done and dec.finished
    assert dec.feed(items[-1]) is None  # nothing after the end


def test_incremental_text_is_taken_as_is():
    items = [
        {"text": "Hel", "meta_info": meta()},
        {"text": "lo", "meta_info": meta()},
        {"text": "", "meta_info": meta(EOS, completion_tokens=3)},
    ]
    deltas = feed_all(ChunkDecoder(stop=[], incremental=True), items)
    assert "".join(d.text for d in deltas) == "Hello"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].text == ""


def test_a_stop_string_spanning_two_pieces_is_not_leaked():
    # The detokenizer sent "Hi\n" before the next token completed "\n\n"; its
    # trimmed final text is then shorter than what it had sent, so the last
    # item brings no new text and the "\n" already streamed must not be emitted.
    items = [
        {"text": "Hi", "meta_info": meta()},
        {"text": "Hi\n", "meta_info": meta()},
        {"text": "Hi", "meta_info": meta(STOP_STR, completion_tokens=3)},
    ]
    deltas = feed_all(ChunkDecoder(stop=["\n\n"], incremental=False), items)
    assert "".join(d.text for d in deltas) == "Hi"
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("reason", [EOS, LENGTH])
def test_held_text_is_flushed_when_no_stop_string_ended_it(reason):
    items = [{"text": "a#", "meta_info": meta()}, {"text": "a#", "meta_info": meta(reason)}]
    deltas = feed_all(ChunkDecoder(stop=["##"], incremental=False), items)
    assert "".join(d.text for d in deltas) == "a#"  # "#" was held as a possible start of "##"


def test_a_stop_string_sglang_missed_ends_the_answer_here():
    dec = ChunkDecoder(stop=["END"], incremental=True)
    deltas = feed_all(dec, [{"text": "one EN", "meta_info": meta()}, {"text": "D two", "meta_info": meta()}])
    assert "".join(d.text for d in deltas) == "one "
    assert deltas[-1].finish_reason == "stop" and deltas[-1].prompt_tokens == 5
    assert dec.done and not dec.finished  # SGLang still runs it: the engine must abort it


def test_aborts_become_xdask_errors():
    dec = ChunkDecoder(stop=[], incremental=False)
    with pytest.raises(InvalidRequestError) as info:
        dec.feed({"text": "", "meta_info": meta(TOO_LONG)})
    assert info.value.code == "context_length_exceeded"
    assert dec.finished  # nothing to abort
    assert isinstance(abort_error({"type": "abort", "message": "The request queue is full.", "status_code": 503}),
                      ModelNotReadyError)
    assert isinstance(abort_error({"type": "abort", "message": "bad regex", "status_code": 400}), InvalidRequestError)
    err = abort_error({"type": "abort", "message": "Aborted", "status_code": None, "err_type": None})
    assert isinstance(err, GenerationError) and "Aborted" in err.message


@pytest.mark.parametrize(
    "exc,cls,code",
    [
        # TokenizerManager._validate_one_request
        (ValueError("The input (4100 tokens) is longer than the model's context length (2048 tokens)."),
         InvalidRequestError, "context_length_exceeded"),
        (ValueError("Requested token count exceeds the model's maximum context length of 2048 tokens. You requested "
                    "a total of 2100 tokens: 100 tokens from the input messages and 2000 tokens for the completion."),
         InvalidRequestError, "context_length_exceeded"),
        # SamplingParams.verify
        (ValueError("top_p must be in (0, 1], got 1.5."), InvalidRequestError, "invalid_sampling_params"),
        (ValueError("temperature must be a non-negative finite number, got -1.0."), InvalidRequestError,
         "invalid_sampling_params"),
        (RuntimeError("Rank 0 scheduler died during initialization (exit code: -9)."), GenerationError, None),
        (ValueError("texts cannot be empty and tokenizer must be initialized"), GenerationError, None),
    ],
)
def test_exceptions_map_to_xdask_errors(exc, cls, code):
    err = error_from_exception(exc)
    assert type(err) is cls and err.code == code
    assert str(exc)[:20] in err.message


def test_http_exceptions_and_xdask_errors_map_through():
    class HTTPException(Exception):  # fastapi's shape, raised for a non-streamed abort
        def __init__(self, status_code: int, detail: str):
            super().__init__(detail)
            self.status_code, self.detail = status_code, detail

    assert isinstance(error_from_exception(HTTPException(503, "busy")), ModelNotReadyError)
    assert isinstance(error_from_exception(HTTPException(500, "oops")), GenerationError)
    original = InvalidRequestError("x", param="stop")
    assert error_from_exception(original) is original


# == tokenizer facts =============================================================================


def test_tokenizer_facts_of_the_tiny_qwen2(tmp_path):
    pytest.importorskip("transformers")
    from support.tiny_models import CHATML_TEMPLATE, build_tokenizer
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    adds_bos, template, special = tokenizer_facts(AutoTokenizer.from_pretrained(tmp_path))
    assert adds_bos is False  # Qwen2: no BOS
    assert template == CHATML_TEMPLATE
    assert special == {"eos_token": "<|im_end|>"}
    assert tokenizer_facts(None) == (False, None, {})


def test_tokenizer_facts_of_a_bos_adding_tokenizer():
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "x": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    adds_bos, template, special = tokenizer_facts(hf)
    assert adds_bos is True and template is None
    assert special == {"bos_token": "<s>", "eos_token": "</s>"}


# == the engine, on a CUDA machine with sglang ======================================================


#: Settings that suit the tiny model (head dim 16) on any CUDA GPU: Triton
#: attention, plain PyTorch sampling, no CUDA graphs (faster start).
TINY_LAUNCH = {
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "disable_cuda_graph": True,
    "mem_fraction_static": 0.3,
    "max_running_requests": 16,
}


def _why_no_sglang() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return SKIP_REASON
    try:
        import torch
    except ImportError:
        return SKIP_REASON
    if not torch.cuda.is_available():
        return f"{SKIP_REASON} (sglang is installed but no CUDA device is visible)"
    return None


@pytest.fixture(scope="module")
def sglang_ready() -> None:
    reason = _why_no_sglang()
    if reason is None:
        return
    if engine_required("sglang"):
        pytest.fail(f"XDASK_TEST_REQUIRE_ENGINES requires the sglang engine: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, sglang_ready) -> Path:
    from support.tiny_models import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = build_engine(str(model_dir), 2048, TINY_LAUNCH)
    eng.load()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    """The same files in plain transformers: (model, tokenizer, eos ids)."""
    return load_hf(model_dir)


def in_flight(engine) -> int:
    """Requests SGLang's TokenizerManager still tracks (its ``rid_to_state``)."""
    return len(engine._engine.tokenizer_manager.rid_to_state)


@pytest.mark.slow
def test_is_an_engine_with_the_models_tokenizer_facts(engine):
    from support.tiny_models import CHATML_TEMPLATE

    assert isinstance(engine, Engine)
    assert engine.name == "sglang"
    assert engine.adds_bos is False
    assert engine.special_tokens == {"eos_token": "<|im_end|>"}
    assert engine.chat_template == CHATML_TEMPLATE
    assert engine.max_concurrency == 16
    facts = engine.describe()
    assert facts["engine"] == "sglang" and facts["context_length"] == 2048 and facts["sglang_version"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_greedy_matches_transformers(engine, hf, prompt):
    _, tok, eos = hf
    expected = hf_greedy(hf, prompt, 16)
    text, last, _ = run(engine, prompt, max_tokens=16)
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert last.finish_reason == ("stop" if expected[-1] in eos else "length")
    assert last.prompt_tokens == len(tok(prompt).input_ids)
    assert last.completion_tokens == len(expected)
    assert run(engine, prompt, max_tokens=16)[0] == text  # greedy is repeatable


@pytest.mark.slow
def test_streams_many_deltas_with_usage_last(engine, hf):
    _, tok, _ = hf
    text, last, pieces = run(engine, PROMPTS[0], max_tokens=32)
    assert len([p for p in pieces if p.text]) > 1, "the answer came in one piece"
    assert last.prompt_tokens == len(tok(PROMPTS[0]).input_ids)
    assert 1 <= last.completion_tokens <= 32
    for n in (1, 5):
        _, last, _ = run(engine, PROMPTS[0], max_tokens=n)
        assert (last.finish_reason == "length" and last.completion_tokens == n) or (
            last.finish_reason == "stop" and last.completion_tokens <= n)


@pytest.mark.slow
def test_stop_strings_cut_the_text(engine):
    full, _, _ = run(engine, PROMPTS[1], max_tokens=24)
    clean = [i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    if not clean:
        pytest.skip(f"no usable stop string in {full!r}")
    stop = full[clean[0] : clean[0] + 2]
    text, last, _ = run(engine, PROMPTS[1], max_tokens=24, stop=["never-there", stop])
    assert text == full[: full.index(stop)]
    assert last.finish_reason == "stop"


@pytest.mark.slow
def test_seed_repeats(engine):
    params = {"temperature": 1.0, "max_tokens": 32}
    a, _, _ = run(engine, PROMPTS[0], seed=7, **params)
    b, _, _ = run(engine, PROMPTS[0], seed=7, **params)
    assert a == b


@pytest.mark.slow
def test_eight_concurrent_requests_match_their_solo_answers(engine):
    solo = {p: run(engine, p, max_tokens=24)[0] for p in PROMPTS}
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def worker(i: int) -> None:
        try:
            start.wait()
            results[i] = run(engine, PROMPTS[i], max_tokens=24)[0]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == [solo[p] for p in PROMPTS]
    assert time.monotonic() - t0 < 60
    assert in_flight(engine) == 0


@pytest.mark.slow
def test_emit_true_aborts_the_request_in_sglang(engine):
    seen: list[Delta] = []

    def emit(delta: Delta) -> bool:
        seen.append(delta)
        return len(seen) >= 2

    t0 = time.monotonic()
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=1900, temperature=0.0), emit)
    assert time.monotonic() - t0 < 10
    assert len(seen) == 2 and all(d.finish_reason is None for d in seen)
    # SGLang drops it: its TokenizerManager no longer tracks the request.
    deadline = time.monotonic() + 10
    while in_flight(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(engine) == 0, "the request kept running after the consumer left"
    # The engine still serves.
    assert run(engine, PROMPTS[0], max_tokens=2)[1].completion_tokens <= 2


@pytest.mark.slow
def test_emit_raising_aborts_too(engine):
    def emit(delta: Delta) -> bool:
        raise KeyError("consumer broke")

    with pytest.raises(KeyError):
        engine.generate(PROMPTS[1], SamplingParams(max_tokens=1900, temperature=0.0), emit)
    deadline = time.monotonic() + 10
    while in_flight(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(engine) == 0


@pytest.mark.slow
def test_prompt_longer_than_context_is_a_400(engine):
    with pytest.raises(InvalidRequestError) as info:
        run(engine, "Hello, how are you today? " * 400)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError):  # prompt + max_tokens over the context
        run(engine, "Hello, how are you today? " * 60, max_tokens=2000)
    with pytest.raises(InvalidRequestError) as info:
        run(engine, PROMPTS[0], top_p=0.0)
    assert info.value.param == "top_p"
    assert run(engine, PROMPTS[0], max_tokens=2)[1].finish_reason is not None


@pytest.mark.slow
def test_a_second_sglang_model_in_the_process_is_refused(engine, model_dir):
    with pytest.raises(ModelLoadError, match="already loaded"):
        build_engine(str(model_dir), 2048, TINY_LAUNCH).load()
    assert run(engine, PROMPTS[0], max_tokens=2)[1].finish_reason is not None


@pytest.mark.slow
def test_close_fails_in_flight_requests_then_rejects(engine, model_dir):
    # Runs last in this module: it closes the shared engine and loads another.
    engine.close()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    eng = build_engine(str(model_dir), 2048, TINY_LAUNCH)
    eng.load()
    # SGLang's launch ran logging.basicConfig(force=True, level="ERROR"): undone.
    assert root.handlers == handlers and root.level == level
    outcome: list[BaseException | str] = []
    first = threading.Event()

    def emit(delta: Delta) -> bool:
        first.set()
        time.sleep(0.001)
        return False

    def long_request() -> None:
        try:
            eng.generate(PROMPTS[0], SamplingParams(max_tokens=1900, temperature=0.0), emit)
            outcome.append("finished")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=long_request)
    t.start()
    assert first.wait(60)
    eng.close()
    t.join(60)
    assert len(outcome) == 1
    assert outcome[0] == "finished" or isinstance(outcome[0], GenerationError), outcome
    with pytest.raises(GenerationError):
        run(eng, PROMPTS[0])
    eng.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("xdask-sglang-")]
