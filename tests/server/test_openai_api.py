"""The OpenAI-compatible API end to end: xdask-local subprocess, real model, official client."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oai(server, default_model) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.endpoint}/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_answers_with_real_usage(oai, default_model):
    resp = oai.chat.completions.create(
        model=default_model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    # Gemma's template wraps the question in turn markers: more tokens than the words.
    assert resp.usage.prompt_tokens > 8
    assert 0 < resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_chat_joins_to_the_same_text(oai, default_model):
    kwargs = dict(model=default_model, messages=[{"role": "user", "content": "Name three colors."}],
                  max_tokens=20, temperature=0)
    whole = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and text.strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_continues_a_pattern(oai, default_model):
    resp = oai.completions.create(model=default_model, prompt="1, 2, 3, 4, 5,", max_tokens=6, temperature=0)
    assert resp.choices[0].text.startswith(" 6")
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens == 6
    assert resp.choices[0].finish_reason == "length"


def test_streamed_completion_and_stop(oai, default_model):
    stream = oai.completions.create(model=default_model, prompt="1, 2, 3, 4, 5,", max_tokens=16,
                                    temperature=0, stop=[","], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    assert text.strip() == "6"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(oai, default_model):
    kwargs = dict(model=default_model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    first = oai.completions.create(**kwargs).choices[0].text
    second = oai.completions.create(**kwargs).choices[0].text
    assert first == second


def test_eight_concurrent_chats_are_each_answered_correctly(oai, default_model):
    """No cross-talk: each answer continues its own count and used its own prompt."""
    starts = list(range(10, 90, 10))

    def count_from(n: int):
        return oai.completions.create(model=default_model, prompt=f"{n}, {n + 1}, {n + 2}, {n + 3},",
                                      max_tokens=4, temperature=0, stop=[","])

    def chat(n: int):
        return oai.chat.completions.create(
            model=default_model, messages=[{"role": "user", "content": f"Say the number {n}."}],
            max_tokens=16, temperature=0)

    solo_chat = {n: chat(n) for n in starts[:2]}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        counts = dict(zip(starts, pool.map(count_from, starts), strict=True))
        chats = dict(zip(starts, pool.map(chat, starts), strict=True))
    for n, resp in counts.items():
        assert resp.choices[0].text.strip() == str(n + 4), (n, resp.choices[0].text)
    for n, resp in chats.items():
        assert resp.choices[0].message.content.strip(), n
        assert resp.usage.completion_tokens > 0
    # Same prompt, same token count: the right prompt reached the model.
    for n, solo in solo_chat.items():
        assert chats[n].usage.prompt_tokens == solo.usage.prompt_tokens


def test_models_list_and_describe(oai, default_model, http):
    ids = [m.id for m in oai.models.list()]
    assert default_model in ids
    desc = http.get(f"/v1/models/{default_model}").json()
    assert desc["model_type"] == "LLM"
    assert "chat" in desc["model_ability"]
    assert desc["model_name"] == "gemma-3-270m" and desc["quantization"] == "Q4_K_M"
    assert desc["model_engine"] == "llama.cpp" and desc["state"] == "ready"


def test_unknown_model_is_404_for_the_openai_client(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["type"] == "not_found_error"
