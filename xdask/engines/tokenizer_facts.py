"""What xdask needs to know of a Hugging Face tokenizer to render prompts for it.

One rule for every engine that loads an HF tokenizer, so that a chat prompt
never starts with two BOS tokens (or none) depending on the engine.
"""

from __future__ import annotations

from typing import Any


def tokenizer_facts(tokenizer: Any) -> tuple[bool, str | None, dict[str, str]]:
    """``(adds_bos, chat_template, special_tokens)`` of an HF tokenizer.

    The engines that take text prompts (transformers, vLLM, SGLang, MLX)
    tokenize with the tokenizer's defaults (``add_special_tokens=True``), so
    the engine adds BOS exactly when encoding does (Llama yes, Qwen no); a
    chat template given as named templates yields its ``default``.
    """
    if tokenizer is None:
        return False, None, {}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    special: dict[str, str] = {}
    for name in ("bos_token", "eos_token"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str) and value:
            special[name] = value
    adds_bos = False
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None:
        try:
            probe = list(tokenizer.encode("x"))
        except Exception:  # noqa: BLE001 - a tokenizer that cannot encode here fails at the first request instead
            probe = []
        adds_bos = bool(probe) and probe[0] == bos_id
    return adds_bos, template if isinstance(template, str) and template else None, special
