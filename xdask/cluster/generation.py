"""Generation requests as they travel from the server to a model actor.

A request is a plain dict (msgpack-friendly, no pickling on the hot path):
``{"kind": "chat" | "completion", "messages" | "prompt", "params": {...}}``.
The server has already validated it with pydantic; this module turns it
into a prompt and ``SamplingParams`` for the engine.
"""

from __future__ import annotations

from typing import Any

from xdask.engines.base import Engine, SamplingParams
from xdask.errors import InvalidRequestError
from xdask.registry.chat_template import render_chat
from xdask.registry.specs import LLMFamily


def build_prompt(family: LLMFamily, request: dict[str, Any], engine: Engine) -> str:
    """The engine prompt for a chat or completion request.

    The family's template wins (it is what we tested); else the one in the
    model files. BOS is rendered only when the engine's tokenizer does not
    add it itself, so a prompt never starts with two.
    """
    kind = request.get("kind")
    if kind == "completion":
        return str(request["prompt"])
    if kind != "chat":
        raise InvalidRequestError(f"unknown request kind {kind!r}")
    if "chat" not in family.model_ability:
        raise InvalidRequestError(f"Model family {family.model_name!r} cannot chat; use /v1/completions")
    template = family.chat_template or engine.chat_template
    if not template:
        raise InvalidRequestError(
            f"Model {family.model_name!r} has no chat template (neither its family spec nor its files carry one); "
            "use /v1/completions"
        )
    tokens = engine.special_tokens
    return render_chat(
        template,
        request["messages"],
        bos_token="" if engine.adds_bos else tokens.get("bos_token", ""),
        eos_token=tokens.get("eos_token", ""),
        **(request.get("chat_template_kwargs") or {}),
    )


def build_params(family: LLMFamily, request: dict[str, Any]) -> SamplingParams:
    """Sampling parameters; chat requests also stop at the family's stop words."""
    params = dict(request.get("params") or {})
    stop = list(params.pop("stop", None) or [])
    if request.get("kind") == "chat":
        stop += [s for s in family.stop if s not in stop]
    return SamplingParams(stop=stop, **params)
