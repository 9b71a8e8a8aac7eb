"""Render a family's chat template into a prompt string.

Why we render ourselves: the model files may carry no template (the Gemma 3
270M GGUF has none), so the family spec is the source of truth, and one
renderer serves every engine that takes a raw prompt. The template runs in
Jinja's immutable sandbox because messages come from untrusted clients.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from xdask.errors import InvalidRequestError


class _TemplateError(Exception):
    """Raised by ``raise_exception`` inside a template."""


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """The prompt for ``messages``; template errors become 400s.

    ``bos_token`` is empty by default because llama.cpp adds BOS itself when
    it tokenizes a prompt; a second one would change the model's output.
    """
    try:
        return _compile(template).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except _TemplateError as exc:
        raise InvalidRequestError(str(exc), param="messages") from exc
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"Chat template failed on these messages: {exc}", param="messages") from exc
    except (TypeError, KeyError, IndexError) as exc:
        raise InvalidRequestError(f"Messages do not fit the chat template: {exc}", param="messages") from exc
