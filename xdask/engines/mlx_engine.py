"""``MLXEngine``: HF-format (and MLX-converted) causal LMs served by ``mlx-lm``.

MLX arrays, streams and the model must be driven from one thread, while the
model actor calls ``generate`` from one thread per request. So ``load()``
starts one scheduler thread that owns everything MLX: it loads the model,
feeds new requests into mlx-lm's ``BatchGenerator`` (continuous batching:
every running sequence shares each decode step, new ones join between
steps) and hands each request the token ids it produced. The request's own
thread turns ids into text (``IncrementalDetokenizer``), cuts at stop
strings (``StopMatcher``) and calls ``emit``; when it needs the sequence
stopped (stop string, client gone) it tells the scheduler, which drops the
sequence from the batch before its next step.

Sampling is ours, not ``mlx_lm.sample_utils.make_sampler``: each sampled
request carries its own PRNG key (so a ``seed`` is reproducible whatever
else is in the batch, and seeds do not race through MLX's global random
state), and temperature is applied before top-p, as OpenAI, vLLM and
transformers do. Greedy requests share mlx-lm's batched argmax.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from pydantic import Field

from xdask.engines.base import Delta, Emit, SamplingParams
from xdask.engines.devices import normalize_gpu_idx
from xdask.engines.options import EngineOptions
from xdask.engines.text import IncrementalDetokenizer, StopMatcher
from xdask.engines.tokenizer_facts import tokenizer_facts
from xdask.errors import (
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    XdaskError,
)
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

#: OpenAI's default temperature (what clients expect when they send none).
_DEFAULT_TEMPERATURE = 1.0


class MLXOptions(EngineOptions):
    """What a launch may pass to the MLX engine (validated; unknown names are a 400).

    Examples
    --------
    >>> MLXOptions.from_kwargs("mlx", {"max_batch_size": 8}).max_batch_size
    8
    """

    #: Sequences decoded together in one step (mlx-lm's ``completion_batch_size``).
    max_batch_size: int = Field(default=16, ge=1)
    #: Prompts prefilled together in one forward pass (capped by ``max_batch_size``).
    prefill_batch_size: int = Field(default=8, ge=1)
    #: Prompt tokens per prefill forward pass; bounds the stall a long prompt adds
    #: to running sequences and the activation memory of a prefill.
    prefill_step_size: int = Field(default=2048, ge=1)
    #: A rotating KV cache of this many tokens per sequence (mlx-lm keeps the first
    #: few and the latest ones): bounds memory, but the model then forgets the middle
    #: of long contexts. None: a full cache.
    max_kv_size: int | None = Field(default=None, ge=1)
    #: Context length served (prompt + completion); None: the family's context
    #: length capped by the model config's ``max_position_embeddings``.
    max_model_len: int | None = Field(default=None, ge=1)
    #: Presence/frequency penalties look at this many latest generated tokens;
    #: None: all of them (OpenAI's definition).
    penalty_context_size: int | None = Field(default=None, ge=1)
    #: LoRA adapters (an mlx-lm adapter folder) applied on load.
    adapter_path: str | None = None
    trust_remote_code: bool = False


@dataclass
class _Request:
    """One generate() call: built by its thread, admitted and fed by the scheduler."""

    ids: list[int]
    params: SamplingParams
    max_tokens: int
    #: (token, finish_reason) from the scheduler, or an exception that ends the request.
    out: queue.SimpleQueue[tuple[int, str | None] | BaseException] = field(default_factory=queue.SimpleQueue)
    uid: int | None = None  # the BatchGenerator's id, set by the scheduler


#: Scheduler inbox items: ("add" | "cancel", request), or None to stop.
_Command = tuple[str, _Request] | None


def rope_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Legacy RoPE keys for a config written by transformers 5.

    transformers 5 moved ``rope_theta`` and ``rope_scaling`` into
    ``rope_parameters``; mlx-lm's Llama/Qwen2 models (0.32) still read only the
    old keys and silently fall back to their own default base (Qwen2: 1e6), so
    such a checkpoint loads but computes different logits. Returns the
    ``model_config`` overrides that restore the old keys; empty when the config
    has them already or its RoPE parameters are per layer type (nested).

    Examples
    --------
    >>> rope_overrides({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})
    {'rope_theta': 10000.0}
    >>> rope_overrides({"rope_theta": 1e6})
    {}
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return {}
    overrides: dict[str, Any] = {}
    if "rope_theta" not in config:
        overrides["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if config.get("rope_scaling") is None and scaling.get("rope_type", "default") != "default":
        overrides["rope_scaling"] = scaling
    return overrides


class MLXEngine:
    """A causal LM served by ``mlx-lm`` with continuous batching on one MLX thread.

    Examples
    --------
    >>> eng = build_engine("/models/qwen2.5-0.5b", 32768, {"max_batch_size": 8})
    >>> eng.load()  # doctest: +SKIP
    >>> eng.generate("Hello", SamplingParams(max_tokens=8, temperature=0), print)  # doctest: +SKIP
    >>> eng.close()
    """

    name: ClassVar[str] = "mlx"

    def __init__(self, model_path: str, options: MLXOptions, context_length: int, gpu_idx: list[int] | None = None):
        self.model_path = model_path
        self.options = options
        self.context_length = context_length
        #: The GPU labels placement booked, shown by describe() only: MLX runs on Metal or the CPU.
        self.gpu_idx = gpu_idx
        self.adds_bos = False
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}
        # Requests beyond the batch wait inside BatchGenerator, already tokenized,
        # so a finishing sequence is replaced at the very next step.
        self.max_concurrency = 2 * options.max_batch_size
        self.max_model_len = context_length
        self.eos_token_ids: set[int] = set()
        #: Scheduler counters: decode steps, widest step, tokens, sequences cancelled early.
        self.stats = {"steps": 0, "max_rows": 0, "tokens": 0, "cancelled": 0}
        self._hf_tokenizer: Any = None
        self._tokenize_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = threading.Event()
        self._versions: dict[str, str] = {}
        self._device = ""

    # -- load / close ----------------------------------------------------------

    def load(self) -> None:
        if self._thread is not None:
            raise ModelLoadError("the MLX engine is already loaded")
        if not Path(self.model_path).is_dir():
            # mlx_lm.load would take a missing path for a hub repo id and try to download it.
            raise ModelLoadError(f"MLX needs a local model folder; {self.model_path!r} is not one")
        self._thread = threading.Thread(target=self._run, name="xdask-mlx", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            error = self._load_error
            if isinstance(error, XdaskError):
                raise error
            raise ModelLoadError(f"mlx-lm could not load {self.model_path}: {type(error).__name__}: {error}") from error

    def close(self) -> None:
        """Stop the scheduler (failing what is in flight) and free the model."""
        self._closed.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                logger.warning("the MLX scheduler thread did not stop within 60 s")
        self._hf_tokenizer = None

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "backend": "mlx-lm",
            **self._versions,
            "device": self._device,
            "gpu_idx": self.gpu_idx,
            "max_batch_size": self.options.max_batch_size,
            "max_model_len": self.max_model_len,
            "max_kv_size": self.options.max_kv_size,
            "batching": "continuous (mlx-lm BatchGenerator)",
            "stats": dict(self.stats),
        }

    # -- requests (caller threads) -----------------------------------------------

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        tokenizer = self._hf_tokenizer
        if self._closed.is_set() or tokenizer is None:
            raise GenerationError("the model is closed" if self._closed.is_set() else "the model is not loaded")
        self._check_params(params)
        ids = self._tokenize(tokenizer, prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)}",
                param="messages", code="context_length_exceeded",
            )
        req = _Request(ids=ids, params=params, max_tokens=min(params.max_tokens, room))
        self._inbox.put(("add", req))
        finished = False
        try:
            finished = self._relay(req, tokenizer, emit)
        finally:
            if not finished:  # stop string, client gone, or emit raised: free the batch row now
                self._inbox.put(("cancel", req))

    def _relay(self, req: _Request, tokenizer: Any, emit: Emit) -> bool:
        """Turn the scheduler's tokens into deltas; True when the scheduler ended the sequence."""
        detok = IncrementalDetokenizer(tokenizer)
        stop = StopMatcher(list(req.params.stop))
        generated = 0
        while True:
            items = [self._next_item(req)]
            while True:  # take every token already waiting: one delta, one emit
                try:
                    items.append(req.out.get_nowait())
                except queue.Empty:
                    break
            text: list[str] = []
            finish: str | None = None
            ended = False  # the scheduler finished the sequence itself
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                token, reason = item
                generated += 1
                ended = reason is not None
                if reason != "stop":  # "stop" from mlx-lm means an EOS id: not part of the text
                    piece, hit = stop.push(detok.add(token))
                    text.append(piece)
                    if hit:
                        finish = "stop"
                        break
                if ended:
                    # Release what the detokenizer and the stop matcher still hold.
                    piece, hit = stop.push(detok.flush())
                    text.append(piece if hit else piece + stop.flush())
                    finish = "stop" if hit else reason
                    break
            if finish is None:
                if "".join(text) and emit(Delta(text="".join(text))):
                    return False
                continue
            emit(Delta(text="".join(text), finish_reason=finish, prompt_tokens=len(req.ids),
                       completion_tokens=generated))
            return ended

    def _next_item(self, req: _Request) -> tuple[int, str | None] | BaseException:
        while True:
            try:
                return req.out.get(timeout=1.0)
            except queue.Empty:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    return GenerationError("the model was closed while generating")

    def _tokenize(self, tokenizer: Any, prompt: str) -> list[int]:
        bos = tokenizer.bos_token
        # A prompt that already starts with BOS text (a raw completion prompt) must not get a second one.
        add_special = not (self.adds_bos and bos and prompt.startswith(bos))
        with self._tokenize_lock:  # HF fast tokenizers may raise "Already borrowed" across threads
            return list(tokenizer(prompt, add_special_tokens=add_special).input_ids)

    @staticmethod
    def _check_params(params: SamplingParams) -> None:
        if params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if params.temperature is not None and params.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0", param="temperature")
        if params.top_p is not None and not 0 < params.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")

    # -- scheduler thread (all MLX work) -------------------------------------------

    def _run(self) -> None:
        try:
            state = self._load_on_thread()
        except BaseException as exc:  # noqa: BLE001 - load() re-raises it in the caller's thread
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._schedule(state)
        finally:
            self._shutdown(state)

    def _load_on_thread(self) -> dict[str, Any]:
        try:
            import mlx.core as mx
            import mlx_lm
            from mlx_lm import load as mlx_load
        except ImportError as exc:
            raise ModelLoadError(
                "the MLX engine needs mlx-lm: pip install 'mlx-lm[cpu]' (Linux) or 'mlx-lm' (macOS)"
            ) from exc
        opts = self.options
        config = json.loads((Path(self.model_path) / "config.json").read_text())
        overrides = rope_overrides(config)
        if overrides:
            logger.info("MLX: mapping transformers-5 rope_parameters to %s", overrides)
        # cast: mlx_lm.load is annotated as returning a 2- or 3-tuple (no overloads on return_config); without
        # return_config it is (model, tokenizer).
        model, tokenizer = cast(
            "tuple[Any, Any]",
            mlx_load(
                self.model_path,
                tokenizer_config={"trust_remote_code": True} if opts.trust_remote_code else None,
                model_config=overrides or None,
                adapter_path=opts.adapter_path,
                trust_remote_code=opts.trust_remote_code,
            ),
        )
        hf = tokenizer._tokenizer
        self.adds_bos, self.chat_template, self.special_tokens = tokenizer_facts(hf)
        self.eos_token_ids = {int(t) for t in tokenizer.eos_token_ids}
        config_len = int(config.get("max_position_embeddings") or 0) or self.context_length
        self.max_model_len = opts.max_model_len or min(self.context_length, config_len)
        self._versions = {
            "mlx_lm_version": mlx_lm.__version__,
            "mlx_version": mx.__version__,  # type: ignore[attr-defined]  # mlx.core's stub omits __version__
        }
        self._device = str(mx.default_device())
        self._hf_tokenizer = hf
        return {"model": model, "generator": None}

    def _new_generator(self, model: Any) -> Any:
        from mlx_lm.generate import BatchGenerator

        opts = self.options
        return BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(self.eos_token_ids)],
            completion_batch_size=opts.max_batch_size,
            prefill_batch_size=min(opts.prefill_batch_size, opts.max_batch_size),
            prefill_step_size=opts.prefill_step_size,
            max_kv_size=opts.max_kv_size,
        )

    def _schedule(self, state: dict[str, Any]) -> None:
        gen = state["generator"] = self._new_generator(state["model"])
        active: dict[int, _Request] = {}
        state["active"] = active
        while True:
            for command in self._take_commands(block=not active):
                if command is None:
                    return
                kind, req = command
                if kind == "add":
                    self._admit(gen, req, active)
                elif req.uid is not None and active.pop(req.uid, None) is not None:
                    gen.remove([req.uid])
                    self.stats["cancelled"] += 1
            if not active:
                continue
            try:
                _, responses = gen.next()
            except Exception as exc:  # a failing step fails its requests, not the engine
                logger.exception("MLX generation step failed")
                for req in active.values():
                    req.out.put(GenerationError(f"mlx-lm failed: {type(exc).__name__}: {exc}"))
                active.clear()
                gen.close()
                gen = state["generator"] = self._new_generator(state["model"])
                continue
            if responses:
                self.stats["steps"] += 1
                self.stats["max_rows"] = max(self.stats["max_rows"], len(responses))
                self.stats["tokens"] += len(responses)
            for r in responses:
                owner = active.get(r.uid)
                if owner is None:
                    continue
                owner.out.put((r.token, r.finish_reason))
                if r.finish_reason is not None:
                    del active[r.uid]

    def _take_commands(self, block: bool) -> list[_Command]:
        commands: list[_Command] = []
        if block:
            commands.append(self._inbox.get())
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _admit(self, gen: Any, req: _Request, active: dict[int, _Request]) -> None:
        try:
            sampler, processors = self._sampling(req)
            (uid,) = gen.insert([req.ids], max_tokens=[req.max_tokens], samplers=[sampler],
                                logits_processors=[processors])
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
            req.out.put(GenerationError(f"mlx-lm could not start the request: {type(exc).__name__}: {exc}"))
            return
        req.uid = uid
        active[uid] = req

    def _sampling(self, req: _Request) -> tuple[Any, list[Any]]:
        """The request's sampler (None: the batch's shared argmax) and logits processors."""
        from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty

        p = req.params
        processors: list[Any] = []
        window = self.options.penalty_context_size or req.max_tokens
        for make, value in ((make_presence_penalty, p.presence_penalty), (make_frequency_penalty, p.frequency_penalty)):
            if value:
                processors.append(_on_generated(make(float(value), window), len(req.ids)))
        temperature = p.temperature if p.temperature is not None else _DEFAULT_TEMPERATURE
        if temperature == 0:
            return None, processors
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        return _KeyedSampler(float(temperature), p.top_p, int(seed)), processors

    def _shutdown(self, state: dict[str, Any]) -> None:
        closed = GenerationError("the model was closed")
        for req in state.get("active", {}).values():
            req.out.put(closed)
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command is not None and command[0] == "add":
                command[1].out.put(closed)
        gen = state.pop("generator", None)
        if gen is not None:
            gen.close()
        del gen  # it holds the model: drop it before clearing MLX's buffer cache
        state.clear()
        import gc

        import mlx.core as mx

        gc.collect()
        mx.clear_cache()  # hand the freed weights and KV buffers back to the OS


class _KeyedSampler:
    """Temperature + top-p sampling with the request's own PRNG key.

    A key per request makes a seed reproducible whatever else shares the
    batch (mlx-lm samples a row with its own sampler when samplers differ).
    Temperature comes before top-p, as in OpenAI and transformers.
    """

    def __init__(self, temperature: float, top_p: float | None, seed: int):
        import mlx.core as mx

        self.temperature = temperature
        self.top_p = top_p if top_p is not None and top_p < 1 else None
        self.key = mx.random.key(seed)

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p

        scaled = logprobs * (1.0 / self.temperature)
        if self.top_p is not None:
            scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), self.top_p)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(scaled, key=sub)


def _on_generated(processor: Any, prompt_len: int) -> Any:
    """Apply an mlx-lm penalty to generated tokens only (mlx-lm passes prompt + generated)."""

    def apply(tokens: Any, logits: Any) -> Any:
        return processor(tokens[prompt_len:], logits)

    return apply


def build_engine(
    model_path: str, context_length: int, kwargs: dict[str, Any], gpu_idx: list[int] | None = None
) -> MLXEngine:
    """Validate launch ``kwargs`` and build the engine (not loaded) for a model folder and a context length.

    ``gpu_idx`` is ignored: MLX has one device (Metal on Apple silicon, else
    the CPU), which CUDA ordinals do not name.

    Examples
    --------
    >>> build_engine("/models/tiny", 2048, {"max_batch_size": 4}).max_concurrency
    8
    """
    gpu_idx = normalize_gpu_idx(gpu_idx)
    if gpu_idx:
        logger.debug("MLX runs on Metal or the CPU; GPU indices %s booked for it are ignored", gpu_idx)
    return MLXEngine(model_path, MLXOptions.from_kwargs("mlx", kwargs), context_length, gpu_idx)


def make_engine(resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any],
                gpu_idx: list[int] | None = None) -> MLXEngine:
    """The engine table's entry point: ``build_engine`` with the family's context length."""
    return build_engine(model_path, resolved.context_length, kwargs, gpu_idx)
