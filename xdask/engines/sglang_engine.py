"""``SGLangEngine``: HF-format models served by SGLang's offline engine (CUDA only).

SGLang's ``Engine`` runs a TokenizerManager in this process (asyncio, ZMQ
sockets) and the scheduler and detokenizer in subprocesses it spawns. Its
``async_generate`` must be driven from one event loop, so ``load()`` starts
a private ``AsyncLoopThread`` and creates the Engine inside it: the Engine
and its TokenizerManager bind to whatever loop is running when they are
created and first used, and that must never be the caller's (the Dask
worker's loop runs heartbeats; the actor's request threads have none).
Each ``generate`` call submits one coroutine to that loop, which streams
SGLang's outputs into a queue read by the calling thread; the calling
thread turns them into ``Delta`` s and calls ``emit``. When ``emit`` asks to
stop (or the caller fails), the request is aborted in SGLang at once.

Written against SGLang's documented offline engine API and its source,
sgl-project/sglang ``main`` as of commit 001067ff (late 2026, the 0.5.2x
series on PyPI), and checked against older shapes where they differ:

* ``python/sglang/srt/entrypoints/engine.py``: ``Engine(**server_args)``,
  ``async_generate(prompt=, sampling_params=, stream=True, rid=)`` (an
  ``async def`` returning the async generator of ``generate_request``),
  ``shutdown()``; ``Engine.__init__`` takes the running loop if there is one
  (``self.loop``). Creating it outside the main thread needs sglang with PR
  #18752 (merged 2026-02-26), which stopped registering a SIGQUIT handler
  there; older releases fail with "signal only works in main thread".
* ``python/sglang/srt/managers/tokenizer_manager.py``: each streamed item
  is ``{"text", "output_ids", "meta_info"}``; ``text`` is cumulative unless
  ``ServerArgs.incremental_streaming_output`` (then a delta: we turn that on
  where it exists); ``meta_info`` has ``id``, ``prompt_tokens``,
  ``completion_tokens`` and ``finish_reason`` (None until the last item).
  ``abort_request(rid=)`` sends an ``AbortReq`` to the scheduler, but only
  while the request's state exists: closing the generator first drops the
  state and turns the abort into a no-op, so we abort *before* letting go.
  Prompts over the context length raise ``ValueError`` ("The input (N tokens)
  is longer than the model's context length", "Requested token count
  exceeds the model's maximum context length"). ``tokenizer_manager.tokenizer``
  is the HF tokenizer.
* ``python/sglang/srt/managers/schedule_batch.py``: ``finish_reason`` is
  ``{"type": "stop", "matched": <token id | str>}``, ``{"type": "length",
  "length": n}`` or ``{"type": "abort", "message", "status_code", "err_type"}``;
  ``managers/utils.py``'s scheduler-side length check aborts with status 400.
* ``python/sglang/srt/managers/detokenizer_manager.py``: a stop string that
  spans two streamed pieces is trimmed only from the final text, after its
  first part was sent, so we cut stop strings ourselves too (``StopMatcher``).
* ``python/sglang/srt/sampling/sampling_params.py``: ``max_new_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``presence_penalty``,
  ``frequency_penalty``, ``sampling_seed`` (OpenAI ``seed``, as SGLang's own
  OpenAI server maps it).
* ``python/sglang/srt/server_args.py``: the ``ServerArgs`` field names below.

SGLang changes its process as a whole: importing it sets uvloop as the asyncio
policy; ``Engine()`` sets the multiprocessing start method to "spawn",
raises the open-files limit, publishes its settings process-wide (so one
Engine per process) and reconfigures root logging (we put the worker's
handlers and level back); ``Engine.shutdown()`` kills *every* child process
of this process. Hence one SGLang model per worker process, enforced here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import json
import logging
import queue
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from xdask import config
from xdask.engines.async_bridge import AsyncLoopThread
from xdask.engines.base import Delta, Emit, SamplingParams
from xdask.engines.devices import (
    normalize_gpu_idx,
    parallel_size,
    require_gpus,
    spawn_env,
)
from xdask.engines.options import EngineOptions
from xdask.engines.text import StopMatcher
from xdask.engines.tokenizer_facts import tokenizer_facts
from xdask.errors import (
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotReadyError,
    XdaskError,
)
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

#: OpenAI's default temperature (what clients expect when they send none).
DEFAULT_TEMPERATURE = 1.0
#: Requests served at once when neither the launch (``max_running_requests``)
#: nor ``xdask.sglang.max-concurrency`` says; SGLang queues any beyond its own
#: limit, which it derives from the KV cache size.
DEFAULT_MAX_CONCURRENCY = 256
#: Seconds to wait, after an abort, for SGLang's last output of the request
#: before dropping it locally (its scheduler answers an abort within a step).
ABORT_GRACE_S = 5.0
#: How many times an abort is sent: one sent while the request was still being
#: tokenized reaches the scheduler before the request and is lost, so it is
#: sent again when the request's next output shows it still runs.
MAX_ABORTS = 3
#: Seconds ``close()`` waits for ``Engine.shutdown()`` (it waits up to 60 s for
#: SGLang's subprocesses to exit).
SHUTDOWN_TIMEOUT_S = 120.0
#: How often a waiting caller thread checks that its request is still alive.
_POLL_S = 1.0

#: ``ServerArgs`` the adapter sets or depends on: not allowed in ``server_args``.
_RESERVED_SERVER_ARGS = frozenset(
    {"model_path", "skip_tokenizer_init", "tokenizer_worker_num", "incremental_streaming_output"}
)


class SGLangOptions(EngineOptions):
    """Launch options passed through to SGLang's ``ServerArgs`` (unknown names are a 400).

    Every option left at None keeps SGLang's own default. ``server_args``
    takes any other ``ServerArgs`` field verbatim; SGLang checks those when
    the model loads.

    Examples
    --------
    >>> opts = SGLangOptions.from_kwargs("sglang", {"tp_size": 2, "mem_fraction_static": 0.8})
    >>> opts.engine_kwargs()
    {'mem_fraction_static': 0.8, 'tp_size': 2}
    """

    #: Share of GPU memory for weights and the KV cache pool.
    mem_fraction_static: float | None = Field(default=None, gt=0, le=1)
    tp_size: int | None = Field(default=None, ge=1)
    dp_size: int | None = Field(default=None, ge=1)
    #: Tokens per request (prompt + completion); None: the family's context
    #: length capped by the model config's ``max_position_embeddings``.
    context_length: int | None = Field(default=None, ge=1)
    #: Requests decoded at once; also the engine's ``max_concurrency``.
    max_running_requests: int | None = Field(default=None, ge=1)
    max_total_tokens: int | None = Field(default=None, ge=1)
    max_prefill_tokens: int | None = Field(default=None, ge=1)
    #: Prompt tokens per prefill chunk; -1 turns chunked prefill off.
    chunked_prefill_size: int | None = Field(default=None, ge=-1)
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    trust_remote_code: bool | None = None
    revision: str | None = None
    tokenizer_path: str | None = None
    attention_backend: str | None = None
    sampling_backend: str | None = None
    schedule_policy: str | None = None
    disable_cuda_graph: bool | None = None
    disable_radix_cache: bool | None = None
    enable_torch_compile: bool | None = None
    random_seed: int | None = None
    base_gpu_id: int | None = Field(default=None, ge=0)
    #: Tokens per streamed output (1: every token).
    stream_interval: int | None = Field(default=None, ge=1)
    #: SGLang's log level (its Engine's default is "error").
    log_level: Literal["debug", "info", "warning", "error", "critical"] | None = None
    #: Cut over-long prompts instead of rejecting them.
    allow_auto_truncate: bool | None = None
    #: Any other ``ServerArgs`` field, passed verbatim.
    server_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("server_args")
    @classmethod
    def _no_shadowing(cls, value: dict[str, Any]) -> dict[str, Any]:
        named = set(cls.model_fields) - {"engine_name", "server_args"}
        clash = sorted(set(value) & (named | _RESERVED_SERVER_ARGS))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be set here (pass a named option directly; the adapter sets the rest)"
            )
        return value

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``sglang.Engine`` (without ``model_path``)."""
        named = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in ("engine_name", "server_args") and getattr(self, name) is not None
        }
        return {**named, **self.server_args}


# -- pure mappings between xdask and SGLang (no sglang needed) ---------------------------


def read_hf_config(model_path: str) -> dict[str, Any]:
    """The model folder's ``config.json``, or ``{}`` when there is none to read."""
    try:
        data = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def effective_context_length(
    requested: int | None, family_context_length: int | None, hf_config: dict[str, Any]
) -> int | None:
    """The ``context_length`` to ask SGLang for; None lets SGLang derive it.

    An explicit launch option wins. Otherwise the family's context length,
    capped by the model's ``max_position_embeddings``: SGLang refuses a
    context longer than the model's own, and a model may be served shorter
    than it can. Without a known model limit SGLang decides.
    """
    if requested:
        return requested
    text_config = hf_config.get("text_config")
    if not isinstance(text_config, dict):
        text_config = {}
    limit = hf_config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    if not family_context_length or not limit:
        return None
    return min(int(family_context_length), int(limit))


def placed_options(options: SGLangOptions, gpu_idx: list[int] | None) -> SGLangOptions:
    """``options`` for a replica on the GPUs placement booked (``gpu_idx``).

    SGLang's scheduler processes are started seeing only the booked GPUs
    (``spawn_env``), so SGLang counts from the first of them: ``base_gpu_id``
    is 0, and ``tp_size`` defaults to the number booked (over ``dp_size``).
    An explicit ``tp_size`` wins unless it needs more GPUs than were booked;
    that, a ``base_gpu_id`` other than 0, or no GPU booked (SGLang runs on
    CUDA only) is a 400. None (not placed) changes nothing.

    Examples
    --------
    >>> placed_options(SGLangOptions(), [2, 3]).engine_kwargs()
    {'tp_size': 2, 'base_gpu_id': 0}
    """
    if gpu_idx is None:
        return options
    require_gpus("sglang", gpu_idx)
    if options.base_gpu_id:
        raise InvalidRequestError(
            f"base_gpu_id={options.base_gpu_id} conflicts with the GPUs placement booked ({gpu_idx}): SGLang "
            "sees only those and starts at the first; leave base_gpu_id unset, or choose the GPUs with gpu_idx",
            param="base_gpu_id", code="invalid_engine_option",
        )
    tp = parallel_size(gpu_idx, options.tp_size, options.dp_size or 1, engine="sglang",
                       option="tp_size", other_option="dp_size")
    return options.model_copy(update={"tp_size": tp, "base_gpu_id": 0})


def check_sampling_params(params: SamplingParams) -> None:
    """Reject out-of-range settings with a 400 that names the parameter.

    SGLang would reject most of them too, but without naming the parameter
    (and it accepts ``max_tokens`` 0); the ranges are OpenAI's and SGLang's.
    """
    if params.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
    if params.temperature is not None and not 0 <= params.temperature < float("inf"):
        raise InvalidRequestError("temperature must be a finite number >= 0", param="temperature")
    if params.top_p is not None and not 0 < params.top_p <= 1:
        raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if value is not None and not -2 <= value <= 2:
            raise InvalidRequestError(f"{name} must be in [-2, 2]", param=name)


def to_sglang_sampling_params(params: SamplingParams, supported: frozenset[str] | None = None) -> dict[str, Any]:
    """OpenAI-named ``SamplingParams`` as SGLang's ``sampling_params`` dict.

    ``supported``: the field names the installed SGLang's ``SamplingParams``
    takes (None: assume all); a setting it lacks is dropped with a warning
    rather than failing every request.

    Examples
    --------
    >>> to_sglang_sampling_params(SamplingParams(max_tokens=8, seed=3, stop=["\\n"]))
    {'max_new_tokens': 8, 'temperature': 1.0, 'sampling_seed': 3, 'stop': ['\\n']}
    """
    out: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        # SGLang turns temperature 0 into greedy decoding (top_k = 1) itself.
        "temperature": DEFAULT_TEMPERATURE if params.temperature is None else params.temperature,
    }
    out.update(params.optional_fields(exclude=("temperature", "seed")))  # top_p and the penalties: same names
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    if supported is not None:
        for name in [n for n in out if n not in supported and n != "max_new_tokens"]:
            logger.warning("this SGLang version has no sampling parameter %r; ignoring it", name)
            del out[name]
    return out


def finish_reason_of(meta_info: dict[str, Any]) -> str | None:
    """``meta_info["finish_reason"]``'s type: "stop", "length", "abort", or None while running."""
    reason = meta_info.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else reason
    return str(kind) if kind else None


def usage_of(meta_info: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` from ``meta_info`` (None where absent)."""

    def count(name: str) -> int | None:
        value = meta_info.get(name)
        return int(value) if isinstance(value, (int, float)) else None

    return count("prompt_tokens"), count("completion_tokens")


_CONTEXT_LENGTH = re.compile(
    r"longer than the model's context length|exceeds the model's maximum context length"
    r"|exceeds the maximum allowed length",
    re.IGNORECASE,
)
# SamplingParams.verify()'s messages: the request's values are out of range.
_BAD_SAMPLING = re.compile(r"\bmust be (?:in|at least|a non-negative|-1)\b|only one of regex", re.IGNORECASE)


def _status(value: Any) -> int | None:
    try:
        return int(value)  # HTTPStatus is an int
    except (TypeError, ValueError):
        return None


def abort_error(reason: dict[str, Any]) -> XdaskError:
    """The error for a request SGLang aborted on its own (a ``{"type": "abort"}`` finish reason)."""
    message = str(reason.get("message") or "SGLang aborted the request")
    status = _status(reason.get("status_code"))
    if _CONTEXT_LENGTH.search(message):
        return InvalidRequestError(message, code="context_length_exceeded")
    if status == 400:
        return InvalidRequestError(message)
    if status == 503:  # its queue is full (max_queued_requests) or it is paused
        return ModelNotReadyError(message)
    return GenerationError(f"SGLang aborted the request: {message}")


def error_from_exception(exc: BaseException) -> XdaskError:
    """The xdask error for an exception raised by SGLang's request path."""
    if isinstance(exc, XdaskError):
        return exc
    message = str(getattr(exc, "detail", None) or exc) or type(exc).__name__
    if _CONTEXT_LENGTH.search(message):
        return InvalidRequestError(message, code="context_length_exceeded")
    if isinstance(exc, ValueError) and _BAD_SAMPLING.search(message):
        return InvalidRequestError(message, code="invalid_sampling_params")
    status = _status(getattr(exc, "status_code", None))  # fastapi.HTTPException of an abort
    if status == 400:
        return InvalidRequestError(message)
    if status == 503:
        return ModelNotReadyError(message)
    return GenerationError(f"SGLang failed: {message}")


class ChunkDecoder:
    """Turns the items SGLang streams for one request into xdask ``Delta`` s.

    ``incremental``: whether SGLang streams text deltas
    (``incremental_streaming_output``) or the text so far. Stop strings are
    cut here too, since SGLang leaks the first part of a stop string that
    spans two streamed pieces.

    Examples
    --------
    >>> dec = ChunkDecoder(stop=[], incremental=False)
    >>> dec.feed({"text": "Hel", "meta_info": {"finish_reason": None}})
    Delta(text='Hel', finish_reason=None, prompt_tokens=None, completion_tokens=None)
    >>> dec.feed({"text": "Hello", "meta_info": {"finish_reason": {"type": "length", "length": 2},
    ...                                          "prompt_tokens": 3, "completion_tokens": 2}})
    Delta(text='lo', finish_reason='length', prompt_tokens=3, completion_tokens=2)
    """

    def __init__(self, stop: list[str], incremental: bool):
        self.incremental = incremental
        self._stop = StopMatcher(list(stop))
        self._seen = 0  # characters of the cumulative text already taken
        #: SGLang sent the request's last output (nothing left to abort).
        self.finished = False
        #: The answer is over: SGLang finished, or a stop string was cut here.
        self.done = False

    def feed(self, chunk: dict[str, Any]) -> Delta | None:
        """The delta to emit for ``chunk`` (None if it brings nothing); raises on an abort."""
        if self.done:
            return None
        meta = chunk.get("meta_info") or {}
        text = chunk.get("text") or ""
        if self.incremental:
            piece = text
        else:
            piece = text[self._seen :]
            self._seen = max(self._seen, len(text))
        reason = meta.get("finish_reason")
        kind = finish_reason_of(meta)
        if kind is not None:
            self.finished = True
        if kind == "abort":
            self.done = True
            raise abort_error(reason if isinstance(reason, dict) else {})
        out, hit = self._stop.push(piece)
        if hit:
            finish = "stop"
        elif kind is not None:
            held = self._stop.flush()
            matched = reason.get("matched") if isinstance(reason, dict) else None
            # Held text that begins the stop string SGLang matched was sent by
            # it before it knew; it is not part of the answer.
            if not (kind == "stop" and isinstance(matched, str)):
                out += held
            finish = kind if kind in ("stop", "length") else "stop"
        else:
            return Delta(text=out) if out else None
        self.done = True
        prompt_tokens, completion_tokens = usage_of(meta)
        return Delta(text=out, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


# -- the engine -------------------------------------------------------------------------

# SGLang keeps its settings process-wide and its shutdown kills every child
# process of this one: a second Engine here would corrupt or kill the first.
_process_lock = threading.Lock()
_process_engine: SGLangEngine | None = None

_END = object()  # the request's stream ended


@dataclass
class _Request:
    """One generate() call, shared by its caller thread and its coroutine on the loop."""

    rid: str | None
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    #: Set by the caller thread: the answer is no longer wanted.
    stopping: bool = False
    aborts_sent: int = 0
    task: asyncio.Task[None] | None = None


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Keep the root logger's handlers and level across SGLang's launch.

    SGLang's ``configure_logger`` calls ``logging.basicConfig(force=True)``,
    which closes the worker's handlers (xdask's rotating log file included)
    and sets the root level to SGLang's ``log_level`` ("error"). The handlers
    are detached while SGLang launches, so they are not closed, then put back;
    SGLang's own console handler is removed and its level applies to its own
    ``sglang`` loggers only. Records logged by other threads meanwhile go to
    SGLang's handler.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for handler in handlers:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def _server_arg_names() -> frozenset[str]:
    """The ``ServerArgs`` fields of the installed SGLang (empty if unknown)."""
    try:
        from sglang.srt.server_args import ServerArgs

        return frozenset(f.name for f in dataclasses.fields(ServerArgs))
    except Exception:  # moved or not a dataclass: use no optional field
        return frozenset()


def _sampling_param_names() -> frozenset[str] | None:
    """The fields SGLang's ``SamplingParams`` takes (None if unknown)."""
    try:
        from sglang.srt.sampling.sampling_params import (
            SamplingParams as SGLangSamplingParams,
        )
    except Exception:
        return None
    fields = getattr(SGLangSamplingParams, "__struct_fields__", None)  # a msgspec.Struct (2026)
    if fields:
        return frozenset(fields)
    try:  # a plain class (2024-2025)
        return frozenset(inspect.signature(SGLangSamplingParams).parameters)
    except (TypeError, ValueError):
        return None


class SGLangEngine:
    """A model served by SGLang's offline ``Engine`` on a private event loop.

    Examples
    --------
    >>> eng = build_engine("/models/qwen2.5-0.5b", 32768, {"mem_fraction_static": 0.5})  # doctest: +SKIP
    >>> eng.load()  # doctest: +SKIP
    >>> eng.generate("Hello", SamplingParams(max_tokens=8), print)  # doctest: +SKIP
    >>> eng.close()  # doctest: +SKIP
    """

    name: ClassVar[str] = "sglang"

    def __init__(
        self,
        model_path: str,
        options: SGLangOptions,
        context_length: int | None = None,
        gpu_idx: list[int] | None = None,
    ):
        self.model_path = model_path
        self.options = options
        #: The GPUs placement booked; SGLang's processes see only these (None: not placed).
        self.gpu_idx = gpu_idx
        #: The context length asked of SGLang (None: SGLang's own); after
        #: ``load()``, the one SGLang serves.
        self.context_length = context_length
        self.max_concurrency = int(
            options.max_running_requests or config.get("sglang.max-concurrency", DEFAULT_MAX_CONCURRENCY)
        )
        self.adds_bos = False
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}
        self._bridge: AsyncLoopThread | None = None
        self._engine: Any = None
        self._incremental = False
        self._accepts_rid = True
        self._sampling_fields: frozenset[str] | None = None
        self._version: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def load(self) -> None:
        global _process_engine
        if self._engine is not None:
            return
        with _process_lock:
            if _process_engine is not None:
                raise ModelLoadError(
                    f"An SGLang model ({_process_engine.model_path}) is already loaded in this process: SGLang "
                    "keeps its settings process-wide and its shutdown kills every child process, so each "
                    "SGLang model needs a worker process of its own"
                )
            _process_engine = self
        bridge = AsyncLoopThread(f"xdask-sglang-{Path(self.model_path).name}")
        try:
            bridge.start()
            # Created on the loop's thread, inside the running loop: Engine and
            # TokenizerManager adopt the running loop as theirs.
            facts = bridge.call(self._create).result()
        except BaseException as exc:
            bridge.stop()
            self._release()
            if isinstance(exc, XdaskError):
                raise
            raise ModelLoadError(f"SGLang could not load {self.model_path}: {exc}") from exc
        self._bridge = bridge
        self._engine = facts.pop("engine")
        for name, value in facts.items():
            setattr(self, name, value)

    def _create(self) -> dict[str, Any]:
        """Import sglang and start its Engine; runs on the loop's thread."""
        try:
            import sglang
        except ImportError as exc:
            raise ModelLoadError(
                f"sglang is not importable ({exc}); pip install sglang on a Linux machine with CUDA"
            ) from exc
        kwargs = self.options.engine_kwargs()
        if self.context_length is not None:
            kwargs.setdefault("context_length", self.context_length)
        if "incremental_streaming_output" in _server_arg_names():
            kwargs["incremental_streaming_output"] = True  # text deltas: no O(n) text rebuild per token
        with spawn_env(self.gpu_idx), _root_logging_kept():  # its scheduler processes start here
            engine = sglang.Engine(model_path=self.model_path, **kwargs)
        logging.getLogger("sglang").setLevel((self.options.log_level or "error").upper())
        tm = engine.tokenizer_manager
        adds_bos, chat_template, special_tokens = tokenizer_facts(getattr(tm, "tokenizer", None))
        return {
            "engine": engine,
            "adds_bos": adds_bos,
            "chat_template": chat_template,
            "special_tokens": special_tokens,
            "context_length": getattr(tm, "context_len", None) or self.context_length,
            "_incremental": bool(getattr(engine.server_args, "incremental_streaming_output", False)),
            "_accepts_rid": "rid" in inspect.signature(engine.async_generate).parameters,
            "_sampling_fields": _sampling_param_names(),
            "_version": getattr(sglang, "__version__", None),
        }

    def close(self) -> None:
        engine, self._engine = self._engine, None
        bridge, self._bridge = self._bridge, None
        retry = False
        try:
            if engine is not None and bridge is not None:
                try:  # on the loop's thread, which owns the engine's sockets
                    bridge.call(engine.shutdown).result(timeout=SHUTDOWN_TIMEOUT_S)
                except concurrent.futures.TimeoutError:
                    logger.warning("SGLang shutdown of %s took over %.0f s", self.model_path, SHUTDOWN_TIMEOUT_S)
                except Exception as exc:
                    logger.warning("SGLang shutdown of %s failed on its loop: %r", self.model_path, exc)
                    retry = True
        finally:
            if bridge is not None:
                bridge.stop()  # cancels requests still in flight: their callers get GenerationError
            if engine is not None:
                if retry:  # e.g. a version whose shutdown runs the loop itself: now it can
                    try:
                        engine.shutdown()
                    except Exception as exc:
                        logger.warning("SGLang shutdown of %s failed: %r", self.model_path, exc)
                self._release()

    def _release(self) -> None:
        global _process_engine
        with _process_lock:
            if _process_engine is self:
                _process_engine = None

    def describe(self) -> dict[str, Any]:
        opts = self.options
        return {
            "engine": self.name,
            "backend": "sglang",
            "sglang_version": self._version,
            "context_length": self.context_length,
            "max_concurrency": self.max_concurrency,
            "gpu_idx": self.gpu_idx,
            "tp_size": opts.tp_size or 1,
            "dp_size": opts.dp_size or 1,
            "mem_fraction_static": opts.mem_fraction_static,
            "dtype": opts.dtype or "auto",
            "quantization": opts.quantization,
            "batching": "continuous (SGLang scheduler, radix prefix cache)",
            "streaming": "incremental" if self._incremental else "cumulative",
        }

    # -- requests (caller threads) ----------------------------------------------------

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        engine, bridge = self._engine, self._bridge
        if engine is None or bridge is None:
            raise GenerationError("the model is closed")
        check_sampling_params(params)
        sampling = to_sglang_sampling_params(params, self._sampling_fields)
        request = _Request(rid=uuid.uuid4().hex if self._accepts_rid else None)
        decoder = ChunkDecoder(params.stop, incremental=self._incremental)
        try:
            future = bridge.run(self._stream(engine, prompt, sampling, request))
        except RuntimeError as exc:
            raise GenerationError("the model is closed") from exc
        ended = False  # the stream is over: nothing to abort
        try:
            while not decoder.done:
                item = self._next(request, future)
                if item is _END:
                    ended = True
                    raise GenerationError("SGLang ended the request without a finish reason")
                if isinstance(item, BaseException):
                    ended = True
                    raise error_from_exception(item) from item
                delta = decoder.feed(item)
                if delta is not None and emit(delta):
                    return
        finally:
            if not (ended or decoder.finished):  # consumer gone, a stop string cut here, or an error
                self._abort(bridge, engine, request)

    @staticmethod
    def _next(request: _Request, future: concurrent.futures.Future[None]) -> Any:
        """The next streamed item; ``_END`` or an exception once the coroutine is gone."""
        while True:
            try:
                return request.out.get(timeout=_POLL_S)
            except queue.Empty:
                if not future.done():
                    continue
            try:  # it may have put its last item just before finishing
                return request.out.get_nowait()
            except queue.Empty:
                pass
            if future.cancelled():
                return GenerationError("the model was closed while generating")
            return future.exception() or _END

    def _abort(self, bridge: AsyncLoopThread, engine: Any, request: _Request) -> None:
        request.stopping = True
        with contextlib.suppress(RuntimeError):  # the loop is stopped: nothing runs any more
            bridge.call_soon(self._abort_on_loop, engine, request)

    # -- the loop's side ------------------------------------------------------------------

    async def _stream(self, engine: Any, prompt: str, sampling: dict[str, Any], request: _Request) -> None:
        """Run one request in SGLang, putting its outputs into ``request.out``."""
        request.task = asyncio.current_task()
        out = request.out
        try:
            if request.stopping:  # given up before it started
                return
            kwargs: dict[str, Any] = {"prompt": prompt, "sampling_params": sampling, "stream": True}
            if request.rid is not None:
                kwargs["rid"] = request.rid
            chunks = await engine.async_generate(**kwargs)
            async for chunk in chunks:
                if request.rid is None:  # an SGLang without ``rid=``: learn the id it chose
                    request.rid = (chunk.get("meta_info") or {}).get("id")
                if request.stopping:
                    self._send_abort(engine, request)  # once more, in case the first overtook the request
                    continue
                out.put(chunk)
        except asyncio.CancelledError:
            if not request.stopping:
                out.put(GenerationError("the model was closed while generating"))
            raise
        except Exception as exc:
            out.put(exc)
        finally:
            out.put(_END)

    def _abort_on_loop(self, engine: Any, request: _Request) -> None:
        self._send_abort(engine, request)
        task = request.task
        if task is not None and not task.done():
            # SGLang answers an abort with the request's last output, which ends
            # the coroutine; if that never comes, drop the request here.
            asyncio.get_running_loop().call_later(ABORT_GRACE_S, task.cancel)

    @staticmethod
    def _send_abort(engine: Any, request: _Request) -> None:
        if request.rid is None or request.aborts_sent >= MAX_ABORTS:
            return
        request.aborts_sent += 1
        try:
            engine.tokenizer_manager.abort_request(rid=request.rid)
        except Exception as exc:  # the request finishes on its own then
            logger.warning("SGLang could not abort request %s: %r", request.rid, exc)


def build_engine(
    model_path: str, context_length: int, kwargs: dict[str, Any], gpu_idx: list[int] | None = None
) -> SGLangEngine:
    """Validate launch ``kwargs`` and build the engine (not loaded; sglang is not imported) for a model folder.

    ``gpu_idx``: the GPUs placement booked (``placed_options``); None: not placed.

    Examples
    --------
    >>> eng = build_engine("/no/such/model", 4096, {"max_running_requests": 32})
    >>> eng.max_concurrency, eng.context_length
    (32, None)
    """
    gpu_idx = normalize_gpu_idx(gpu_idx)
    options = placed_options(SGLangOptions.from_kwargs("sglang", kwargs), gpu_idx)
    ctx = effective_context_length(options.context_length, context_length, read_hf_config(model_path))
    return SGLangEngine(model_path, options, ctx, gpu_idx)


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> SGLangEngine:
    """The engine table's entry point: ``build_engine`` with the family's context length."""
    return build_engine(model_path, resolved.context_length, kwargs, gpu_idx)
