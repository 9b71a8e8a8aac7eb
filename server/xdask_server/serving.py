"""Engine-agnostic OpenAI logic: requests in, response bodies and chunks out.

No Tornado here: the handlers pass validated requests to ``OpenAIServing``
and write what it returns, so this logic is testable and reusable (the
Jupyter extension can serve the same API).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from xdask import config
from xdask.cluster.supervisor import Supervisor
from xdask.errors import InvalidRequestError, RequestTimeoutError
from xdask.protocol import internal_request, resolve_max_tokens
from xdask.registry import list_families
from xdask.registry.families import type_fact_names
from xdask.responses import chat_completion, text_completion
from xdask_server.limits import admit
from xdask_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from xdask_server.stats import RequestStats


def _replica_view(rep: dict[str, Any]) -> dict[str, Any]:
    return {
        "replica_id": rep["replica_id"],
        "address": rep["address"],
        "gpu_idx": rep.get("gpu_idx") or [],
        "state": rep["state"],
        "since": rep.get("since"),
        "attempts": rep.get("attempts", 1),
        "error": rep.get("error"),
        "load": rep.get("load"),
        "engine": rep.get("engine"),
    }


def describe(record: dict[str, Any]) -> dict[str, Any]:
    """A running model in Xinference's ``describe_model`` shape (+ OpenAI ids, replicas, history)."""
    spec = record["spec"]
    replicas = record["replicas"]
    serving = [r for r in replicas if r["state"] == "ready"] or replicas
    return {
        "id": record["model_uid"],
        "object": "model",
        "created": int(record.get("created", 0)),
        "owned_by": "xdask",
        "model_type": spec["model_type"],
        "address": serving[0]["address"] if serving else None,
        "accelerators": [str(i) for r in replicas for i in (r.get("gpu_idx") or [])],
        "model_name": spec["model_name"],
        "model_lang": spec["model_lang"],
        "model_ability": spec["model_ability"],
        "model_description": spec["model_description"],
        "model_format": spec["model_format"],
        "model_size_in_billions": spec["model_size_in_billions"],
        "model_family": spec["model_family"],
        "quantization": spec["quantization"],
        "model_engine": spec["model_engine"],
        "model_hub": "huggingface",
        "revision": None,
        "context_length": spec["context_length"],
        "replica": len(replicas),
        "state": record["state"],
        "restart_on_failure": record.get("restart_on_failure", True),
        "request_limits": spec.get("request_limits"),
        "engine": serving[0].get("engine") if serving else None,
        "replicas": [_replica_view(r) for r in replicas],
        "history": record.get("history", []),
        # Type-specific facts: an embedding model's dimensions and max_tokens, a reranker's type, ...
        **{name: spec[name] for name in type_fact_names(spec["model_type"]) if name in spec},
    }


def registrations(model_type: str, detailed: bool) -> list[dict[str, Any]]:
    """``GET /v1/model_registrations/{type}`` in Xinference's shape."""
    out = []
    for fam in list_families(model_type):
        item: dict[str, Any] = {"model_name": fam.model_name, "is_builtin": fam.is_builtin}
        if detailed:
            item.update(fam.model_dump(mode="json", exclude={"chat_template"}))
        out.append(item)
    return out


def check_model_type(record: dict[str, Any], model_type: str, endpoint: str) -> None:
    """400 ``wrong_model_type`` when ``endpoint`` is called on a model of another type."""
    actual = record["spec"].get("model_type") or "LLM"
    if actual != model_type:
        raise InvalidRequestError(
            f"Model {record['model_uid']} is a{'n' if actual[0] in 'aeiouAEIOU' else ''} {actual} model; "
            f"{endpoint} serves {model_type} models",
            param="model", code="wrong_model_type",
        )


class _Usage:
    """Token counts reported by the engine in its last message."""

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0

    def update(self, msg: dict[str, Any]) -> None:
        if msg.get("u"):
            self.prompt, self.completion = msg["u"]

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


class OpenAIServing:
    """Chat and completion requests against the models of a ``Supervisor``.

    Every request is counted in ``stats`` (per model: in flight, finished,
    failed, cancelled, tokens, latency) for the dashboard and metrics.
    """

    def __init__(self, supervisor: Supervisor, stats: RequestStats | None = None):
        self.supervisor = supervisor
        self.stats = stats if stats is not None else RequestStats()

    async def _internal(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        record = await self.supervisor._record(req.model)
        check_model_type(record, "LLM", "/v1/chat/completions" if isinstance(req, ChatCompletionRequest)
                         else "/v1/completions")
        max_tokens = resolve_max_tokens(req.requested_max_tokens, int(record["spec"]["context_length"]))
        return internal_request(req, max_tokens)

    async def _messages(self, uid: str, internal: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        deadline = float(config.get("server.request-timeout"))
        try:
            async with asyncio.timeout(deadline):
                async for msg in self.supervisor.stream(uid, internal):
                    yield msg
        except TimeoutError as exc:
            raise RequestTimeoutError(f"The model took longer than {deadline} s") from exc

    # -- non-streaming -----------------------------------------------------

    async def complete(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        """The whole response body of a chat or completion request."""
        await admit(self.supervisor, self.stats, req.model)
        with self.stats.track(req.model, streamed=False) as tracker:
            internal = await self._internal(req)
            text: list[str] = []
            finish: str | None = None
            usage = _Usage()
            async for msg in self._messages(req.model, internal):
                tracker.message(msg)
                text.append(msg["t"])
                finish = msg["f"] or finish
                usage.update(msg)
        build = chat_completion if isinstance(req, ChatCompletionRequest) else text_completion
        return build(req.model, "".join(text), finish, usage.as_dict())

    # -- streaming -----------------------------------------------------------

    async def stream(self, req: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """The SSE chunks of a streamed request (without ``[DONE]``).

        Closing the iterator early (the client hung up) counts the request as
        cancelled and cancels the generation.
        """
        await admit(self.supervisor, self.stats, req.model)
        with self.stats.track(req.model, streamed=True) as tracker:
            internal = await self._internal(req)
            chat = isinstance(req, ChatCompletionRequest)
            base = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": req.model,
            }
            include_usage = req.include_usage
            extra = {"usage": None} if include_usage else {}
            usage = _Usage()

            def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
                if chat:
                    delta: dict[str, Any] = {}
                    if first:
                        delta["role"] = "assistant"
                    if text is not None:
                        delta["content"] = text
                    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                else:
                    choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
                return {**base, "choices": [choice], **extra}

            if chat:
                yield chunk("", None, first=True)
            finish: str | None = None
            async for msg in self._messages(req.model, internal):
                tracker.message(msg)
                usage.update(msg)
                finish = msg["f"] or finish
                if msg["t"]:
                    yield chunk(msg["t"], None)
            yield chunk(None if chat else "", finish or "stop")
            if include_usage:
                yield {**base, "choices": [], "usage": usage.as_dict()}
