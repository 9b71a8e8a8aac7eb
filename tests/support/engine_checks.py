"""What the engine-level tests (MLX, SGLang, ...) share: prompts, a run helper, the transformers reference.

One copy, so that every engine is held to the same conformance check:
greedy ids of plain ``transformers.generate`` on the same model files.
"""

from __future__ import annotations

from typing import Any

from xdask.engines.base import Delta, SamplingParams

PROMPTS = [
    "Hello, how are you",
    "The quick brown fox",
    "Numbers: 0 1 2",
    "Write a short story about",
    "Dask schedules tasks",
    "What is the capital of France?",
    "You are a helpful assistant.",
    "I am fine, thank",
]


def run(engine: Any, prompt: str, **params: Any) -> tuple[str, Delta, list[Delta]]:
    """One greedy (by default) 16-token request; checks only the last delta carries a finish reason."""
    pieces: list[Delta] = []
    engine.generate(prompt, SamplingParams(**{"max_tokens": 16, "temperature": 0.0, **params}),
                    lambda d: pieces.append(d) or False)
    assert pieces and pieces[-1].finish_reason is not None
    assert all(d.finish_reason is None for d in pieces[:-1])
    return "".join(d.text for d in pieces), pieces[-1], pieces


def load_hf(model_dir: Any) -> tuple[Any, Any, set[int]]:
    """The same files in plain transformers: (model, tokenizer, eos ids)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    return model, tok, set(eos if isinstance(eos, list) else [eos])


def hf_greedy(hf: tuple[Any, Any, set[int]], prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy completion ids, up to and including the first EOS."""
    import torch

    model, tok, eos = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out
