"""The MLX engine (mlx-lm) on the tiny random Qwen2, engine level: no Dask, no HTTP.

Greedy text is checked against plain transformers on the same files (the
cross-engine conformance fixture), penalties against a reference loop in
torch, and concurrency against each prompt's solo answer.

CI sets XDASK_TEST_REQUIRE_ENGINES=mlx (a comma list) so that a missing
mlx-lm fails instead of skipping.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support.servers import engine_required

try:
    import mlx.core as mx
    import mlx_lm  # noqa: F401
except ImportError as exc:
    if engine_required("mlx"):
        raise ImportError("mlx-lm is not importable but XDASK_TEST_REQUIRE_ENGINES requires the mlx engine") from exc
    pytest.skip(f"mlx-lm is not importable ({exc}); pip install 'mlx-lm[cpu]'", allow_module_level=True)

from support.engine_checks import PROMPTS, hf_greedy, load_hf, run
from support.tiny_models import CHATML_TEMPLATE, build_tiny_qwen2

from xdask.engines.base import Delta, Engine, SamplingParams
from xdask.engines.mlx_engine import build_engine, rope_overrides
from xdask.errors import GenerationError, InvalidRequestError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = build_engine(str(model_dir), 2048, {"max_batch_size": 8})
    eng.load()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    """The same files in plain transformers: (model, tokenizer, eos ids)."""
    import torch

    # A hidden-64 model gains nothing from torch's thread pool, which only fights
    # MLX's and the other work on a shared 2-core machine (10x slower there).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_hf(model_dir)
    torch.set_num_threads(threads)


def test_is_an_engine(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "mlx"
    assert engine.adds_bos is False  # the tiny tokenizer has no BOS
    assert engine.special_tokens == {"eos_token": "<|im_end|>"}
    assert engine.chat_template == CHATML_TEMPLATE
    facts = engine.describe()
    assert facts["engine"] == "mlx" and facts["max_batch_size"] == 8 and facts["max_model_len"] == 2048


def test_fixture_uses_transformers5_rope_layout(model_dir):
    # The conformance test below only means something for this layout if the shim is needed.
    import json

    config = json.loads((model_dir / "config.json").read_text())
    assert "rope_theta" not in config
    assert rope_overrides(config) == {"rope_theta": config["rope_parameters"]["rope_theta"]}


@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_greedy_matches_transformers(engine, hf, prompt):
    _, tok, eos = hf
    expected_ids = hf_greedy(hf, prompt, 16)
    text, last, _ = run(engine, prompt, max_tokens=16)
    assert text == tok.decode(expected_ids, skip_special_tokens=True)
    assert last.finish_reason == ("stop" if expected_ids[-1] in eos else "length")
    assert last.prompt_tokens == len(tok(prompt).input_ids)
    assert last.completion_tokens == len(expected_ids)


def test_usage_counts_follow_max_tokens(engine, hf):
    _, tok, _ = hf
    for n in (1, 5):
        text, last, _ = run(engine, PROMPTS[0], max_tokens=n)
        assert (last.finish_reason, last.completion_tokens) == ("length", n)
        assert last.prompt_tokens == len(tok(PROMPTS[0]).input_ids)
        assert text == tok.decode(hf_greedy(hf, PROMPTS[0], n), skip_special_tokens=True)


def test_stop_strings_cut_the_text(engine):
    full, _, _ = run(engine, PROMPTS[1], max_tokens=24)
    clean = [i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, f"no usable stop string in {full!r}"
    stop = full[clean[0] : clean[0] + 2]
    text, last, _ = run(engine, PROMPTS[1], max_tokens=24, stop=["never-there", stop])
    assert text == full[: full.index(stop)]
    assert stop not in text
    assert last.finish_reason == "stop"
    assert 1 <= last.completion_tokens < 24
    # Text held back as a possible start of a stop string is released at the end.
    text, last, _ = run(engine, PROMPTS[1], max_tokens=24, stop=[full[-1] + "\x00never"])
    assert (text, last.finish_reason) == (full, "length")


def test_seed_repeats(engine):
    params = {"temperature": 1.0, "max_tokens": 32}
    a, _, _ = run(engine, PROMPTS[0], seed=7, **params)
    b, _, _ = run(engine, PROMPTS[0], seed=7, **params)
    c, _, _ = run(engine, PROMPTS[0], seed=8, **params)
    greedy, _, _ = run(engine, PROMPTS[0], max_tokens=32)
    assert a == b
    assert a != c and a != greedy
    # top_p keeps only the head of the distribution; tiny top_p is greedy.
    near_greedy, _, _ = run(engine, PROMPTS[0], seed=7, top_p=1e-6, **params)
    assert near_greedy == greedy


def test_temperature_none_means_sampling(engine):
    greedy, _, _ = run(engine, PROMPTS[2], max_tokens=32)
    texts = {run(engine, PROMPTS[2], max_tokens=32, temperature=None, seed=s)[0] for s in (1, 2)}
    assert greedy not in texts and len(texts) == 2


def reference_penalized(hf, prompt: str, n: int, presence: float, frequency: float,
                        include_prompt: bool = False) -> str:
    """Greedy decoding with presence/frequency penalties in torch (OpenAI: over generated tokens)."""
    import torch

    model, tok, eos = hf
    ids = tok(prompt).input_ids
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + generated])).logits[0, -1].clone()
            seen = ids + generated if include_prompt else generated
            for t in set(seen):
                logits[t] -= presence + frequency * seen.count(t)
            token = int(logits.argmax())
            generated.append(token)
            if token in eos:
                break
    return tok.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("presence,frequency", [(3.0, 0.0), (0.0, 1.5)])
def test_penalties_match_reference(engine, hf, presence, frequency):
    # A prompt that ends with the model's own greedy answer is full of tokens the
    # model likes to repeat: penalties change the answer, and penalizing the
    # prompt too (mlx-lm's own context) would change it differently.
    prompt = PROMPTS[4] + run(engine, PROMPTS[4], max_tokens=24)[0]
    plain, _, _ = run(engine, prompt, max_tokens=24)
    expected = reference_penalized(hf, prompt, 24, presence, frequency)
    assert expected != plain
    assert expected != reference_penalized(hf, prompt, 24, presence, frequency, include_prompt=True)
    text, _, _ = run(engine, prompt, max_tokens=24, presence_penalty=presence, frequency_penalty=frequency)
    assert text == expected


def test_concurrent_requests_are_batched_and_exact(engine):
    solo = {p: run(engine, p, max_tokens=24)[0] for p in PROMPTS}
    seeded_solo = run(engine, PROMPTS[0], max_tokens=24, temperature=1.0, seed=11)[0]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS) + 1)

    def worker(i: int) -> None:
        try:
            start.wait()
            if i == len(PROMPTS):
                results[i] = run(engine, PROMPTS[0], max_tokens=24, temperature=1.0, seed=11)[0]
            else:
                results[i] = run(engine, PROMPTS[i], max_tokens=24)[0]
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    rows_before = engine.stats["max_rows"]
    engine.stats["max_rows"] = 0
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == [solo[p] for p in PROMPTS]
    assert results[len(PROMPTS)] == seeded_solo  # a seed holds under batching (own PRNG key)
    assert engine.stats["max_rows"] > 1, "requests were decoded one at a time"
    engine.stats["max_rows"] = max(rows_before, engine.stats["max_rows"])


def test_emit_true_stops_generation(engine):
    seen: list[Delta] = []
    tokens_before = engine.stats["tokens"]
    cancelled_before = engine.stats["cancelled"]

    def emit(delta: Delta) -> bool:
        seen.append(delta)
        return True

    t0 = time.perf_counter()
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=1500, temperature=0.0), emit)
    elapsed = time.perf_counter() - t0
    assert len(seen) == 1 and seen[0].finish_reason is None
    deadline = time.monotonic() + 5
    while engine.stats["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats["cancelled"] == cancelled_before + 1
    assert engine.stats["tokens"] - tokens_before < 100, "the sequence kept decoding after the client left"
    assert elapsed < 5
    # The engine is still healthy afterwards.
    assert run(engine, PROMPTS[0], max_tokens=2)[1].completion_tokens == 2


def test_prompt_longer_than_context_is_rejected(engine):
    long_prompt = "Hello, how are you today? " * 400
    with pytest.raises(InvalidRequestError) as info:
        run(engine, long_prompt)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError):
        run(engine, "")


def test_completion_is_capped_by_context(engine, hf):
    _, tok, _ = hf
    ids = tok("Hello, how are you today? " * 400).input_ids
    prompt = tok.decode(ids[:2040])
    n = len(tok(prompt).input_ids)
    room = 2048 - n
    assert 1 <= room < 100
    _, last, _ = run(engine, prompt, max_tokens=100)
    assert last.prompt_tokens == n
    assert last.finish_reason == "stop" and last.completion_tokens <= room or (
        last.finish_reason == "length" and last.completion_tokens == room)


@pytest.mark.parametrize("params,name", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_bad_sampling_values_are_rejected(engine, params, name):
    with pytest.raises(InvalidRequestError) as info:
        run(engine, PROMPTS[0], **params)
    assert info.value.param == name


def test_unknown_or_bad_option_is_rejected(model_dir):
    with pytest.raises(InvalidRequestError) as info:
        build_engine(str(model_dir), 2048, {"max_batch_sise": 4})
    assert "max_batch_sise" in info.value.message and "max_batch_size" in info.value.message
    with pytest.raises(InvalidRequestError):
        build_engine(str(model_dir), 2048, {"max_batch_size": 0})


def test_close_fails_in_flight_then_rejects_and_frees(model_dir):
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    before = mx.get_active_memory()  # the module's engine, idle
    eng = build_engine(str(model_dir), 2048, {"max_batch_size": 2})
    eng.load()
    assert mx.get_active_memory() - before > 0.5 * weights
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
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    t = threading.Thread(target=long_request)
    t.start()
    assert first.wait(30)
    eng.close()
    t.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], GenerationError), outcome
    with pytest.raises(GenerationError):
        run(eng, PROMPTS[0])
    assert mx.get_active_memory() - before < 0.1 * weights


def test_load_errors_are_model_load_errors(tmp_path):
    from xdask.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        build_engine(str(tmp_path / "missing"), 2048, {}).load()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError):
        build_engine(str(tmp_path), 2048, {}).load()
