"""The transformers engine in-process: continuous batching, sampling, errors, and real weights.

The HTTP path is covered in test_engines_http.py; here we look inside the
engine (did concurrent requests really share forward passes?) and load the
real Gemma 3 270M GGUF through transformers as a real-weights check.
"""

from __future__ import annotations

import threading
import time

import pytest
from support.servers import engine_required

if not engine_required("transformers"):
    pytest.importorskip("transformers", reason="transformers is not installed here")
    pytest.importorskip("torch", reason="torch is not installed here")

from xdask.engines.base import SamplingParams
from xdask.errors import InvalidRequestError

PROMPTS = [f"Write about {w} please" for w in
           ("a cat", "dogs and more dogs", "x", "the quick brown fox jumps", "numbers 1 2 3", "Paris", "hi", "robots")]


@pytest.fixture(scope="module")
def engine(tiny_qwen2):
    from xdask.engines.transformers import build_engine

    eng = build_engine(str(tiny_qwen2), 2048, {"max_batch_size": 8})
    eng.load()
    yield eng
    eng.close()


def _run(eng, prompt: str, **kw):
    out = []
    eng.generate(prompt, SamplingParams(**kw), lambda d: out.append(d) and False)
    return "".join(d.text for d in out), out[-1]


def test_concurrent_requests_share_forward_passes_and_keep_their_answers(engine):
    solo = {p: _run(engine, p, max_tokens=24, temperature=0)[0] for p in PROMPTS}
    steps_before = engine.stats["steps"]
    results: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda p=p: results.__setitem__(p, _run(engine, p, max_tokens=24, temperature=0)[0]))
        for p in PROMPTS
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo
    # Eight 24-token answers decoded one at a time would take ~8 * 23 steps; batched, far fewer.
    assert engine.stats["max_rows"] >= 4
    assert engine.stats["steps"] - steps_before < 4 * 23


def test_rows_with_different_settings_in_one_batch(engine):
    """Greedy, sampled and penalised rows decode together without changing each other."""
    greedy = _run(engine, PROMPTS[0], max_tokens=16, temperature=0)[0]
    seeded = _run(engine, PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.8, seed=5)[0]
    out: dict[str, str] = {}
    jobs = {
        "g": dict(prompt=PROMPTS[0], max_tokens=16, temperature=0),
        "s": dict(prompt=PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.8, seed=5),
        "p": dict(prompt=PROMPTS[2], max_tokens=16, temperature=0, frequency_penalty=2.0, presence_penalty=1.0),
    }
    threads = [threading.Thread(target=lambda k=k, j=j: out.__setitem__(k, _run(engine, j.pop("prompt"), **j)[0]))
               for k, j in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["g"] == greedy and out["s"] == seeded
    assert out["p"]


def test_sampling_rules():
    """Penalties push down tokens already generated; top_p keeps the nucleus; seeds repeat."""
    import torch

    from xdask.engines.transformers.sampling import RowSampling, sample

    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0], [0.0, 3.0, 2.5, 0.0]])
    rows = [RowSampling(temperature=0, top_p=1), RowSampling(temperature=0, top_p=1, presence_penalty=1.0)]
    assert sample(logits.clone(), rows, [[1], [1]]) == [1, 2]
    nucleus = [RowSampling(temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(sample(logits.repeat(10, 1), nucleus, [[]] * 20)) == {1}

    def seeded():
        return sample(logits, [RowSampling(1.0, 1.0, generator=torch.Generator().manual_seed(3))] * 2, [[], []])

    assert seeded() == seeded()


def test_cancel_stops_the_row(engine):
    got = []

    def emit(delta):
        got.append(delta)
        return len(got) >= 3  # the client goes away after three pieces

    start = time.monotonic()
    engine.generate(PROMPTS[3], SamplingParams(max_tokens=1000, temperature=0), emit)
    assert time.monotonic() - start < 10
    assert len(got) == 3 and got[-1].finish_reason is None
    assert _run(engine, PROMPTS[3], max_tokens=4, temperature=0)[1].completion_tokens == 4


def test_prompt_too_long_is_a_400(engine):
    with pytest.raises(InvalidRequestError, match="context length"):
        engine.generate("word " * 3000, SamplingParams(max_tokens=4), lambda d: False)


def test_length_and_eos_accounting(engine):
    text, last = _run(engine, PROMPTS[4], max_tokens=5, temperature=0)
    assert last.finish_reason == "length" and last.completion_tokens == 5 and last.prompt_tokens > 3


def test_unknown_option_lists_the_accepted_ones(tiny_qwen2):
    from xdask.engines.transformers import build_engine

    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        build_engine(str(tiny_qwen2), 2048, {"max_batchsize": 4})


@pytest.mark.slow
def test_real_gemma_gguf_weights_through_transformers():
    """transformers dequantizes the packaged Gemma 3 270M GGUF; greedy text must be the model's, not noise."""
    pytest.importorskip("gguf", reason="transformers needs the gguf package for GGUF files")
    from xdask.engines.transformers import build_engine
    from xdask.hub import locate_model
    from xdask.registry import resolve

    path = str(locate_model(resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")))
    eng = build_engine(path, 32768, {"max_model_len": 512})
    eng.load()
    try:
        counting = {}
        threads = [
            threading.Thread(target=lambda p=p: counting.__setitem__(p, _run(eng, p, max_tokens=8, temperature=0)[0]))
            for p in ("One, two, three, four,", "The Eiffel Tower is in the city of")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # llama.cpp on the same file answers " five, six, seven, eight," and " Paris, France. ..."
        assert counting["One, two, three, four,"].startswith(" five, six, seven")
        assert "Paris" in counting["The Eiffel Tower is in the city of"]
        # The GGUF says prompts start with BOS; transformers' converted tokenizer forgets it, the engine does not.
        assert eng.adds_bos is True and eng.special_tokens["bos_token"] == "<bos>"
    finally:
        eng.close()


def test_slot_layout_gives_the_dynamic_layouts_answers(tiny_qwen2):
    """The KV-slot layout (CUDA's default, with CUDA graphs there) computes the same greedy text.

    On the CPU it runs without graphs; the H100 benchmark checks graphs against
    the dynamic layout in float32 (bench_transformers_gpu.py).
    """
    from xdask.engines.transformers import build_engine

    answers = {}
    for layout in ("dynamic", "slots"):
        eng = build_engine(str(tiny_qwen2), 2048, {"kv_layout": layout, "max_batch_size": 4})
        eng.load()
        try:
            assert eng.describe()["kv_layout"] == layout
            out: dict[str, str] = {}
            # 8 requests, 4 slots: rows leave and join. The threads are joined before the loop moves on, so
            # ``out`` and ``eng`` are still this layout's when they run.
            threads = [
                threading.Thread(
                    target=lambda p=p, n=n: out.__setitem__(p, _run(eng, p, max_tokens=n, temperature=0)[0])  # noqa: B023
                )
                for n, p in enumerate(PROMPTS, start=10)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            answers[layout] = out
        finally:
            eng.close()
    assert answers["slots"] == answers["dynamic"]
