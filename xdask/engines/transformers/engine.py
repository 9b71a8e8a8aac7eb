"""``TransformersEngine``: any causal LM transformers loads, with continuous batching.

One scheduler thread owns the model. Each turn it admits waiting requests
(prefilled together, up to ``max_prefill_tokens``), joins them to the
running batch, runs one decode step for every running sequence, samples,
and hands each sequence its text. Caller threads (one per request, from
the model actor) only enqueue and wait, so concurrent requests share every
forward pass instead of queueing behind each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

from xdask.engines.base import Delta, Emit, SamplingParams
from xdask.engines.gguf_meta import gguf_adds_bos, gguf_chat_template
from xdask.engines.text import IncrementalDetokenizer, StopMatcher
from xdask.engines.tokenizer_facts import tokenizer_facts
from xdask.engines.transformers.options import TransformersOptions, choose_device
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

#: OpenAI's default temperature (what clients expect when they send none).
_DEFAULT_TEMPERATURE = 1.0


@dataclass
class _Request:
    """One generate() call as the scheduler sees it."""

    ids: list[int]
    params: SamplingParams
    emit: Emit
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # Filled in when admitted:
    sampling: Any = None
    detok: Any = None
    stop: Any = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    last: int = 0  # the token to feed next (slots layout)


class TransformersEngine:
    """A ``transformers`` causal LM served with our continuous-batching scheduler.

    Examples
    --------
    >>> eng = TransformersEngine("/models/qwen2.5-0.5b", TransformersOptions(), 32768)  # doctest: +SKIP
    >>> eng.load()
    >>> eng.generate("Hello", SamplingParams(max_tokens=8, temperature=0), print)
    """

    name: ClassVar[str] = "transformers"

    def __init__(
        self,
        model_path: str,
        options: TransformersOptions,
        context_length: int,
        gpu_idx: list[int] | None = None,
    ):
        self.model_path = model_path
        self.options = options
        self.context_length = context_length
        #: The GPU placement booked (``[]``: the CPU; None: not placed).
        self.gpu_idx = gpu_idx
        self.adds_bos = True
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}
        self.max_concurrency = 1
        self.max_model_len = context_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._eos: set[int] = set()
        self._prepend_bos = False
        self.layout = "dynamic"
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._running: list[_Request] = []
        self._waiting: list[_Request] = []
        self.stats = {"steps": 0, "max_rows": 0, "prefills": 0}

    # -- load / close ----------------------------------------------------------

    def load(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ModelLoadError(
                "the transformers engine needs torch and transformers: pip install 'xdask[transformers]'"
            ) from exc
        opts = self.options
        self._device = torch.device(choose_device(opts.device, self.gpu_idx, torch.cuda.is_available()))
        if self._device.type == "cpu":
            threads = opts.n_threads or (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
            torch.set_num_threads(threads)
        if self._device.type == "cuda":
            # cuDNN's attention builds a new plan for every KV length: each decode step
            # would pay it (FACTS.md: 3-4x slower). Flash/memory-efficient SDPA do not.
            torch.backends.cuda.enable_cudnn_sdp(False)
        dtype_name = opts.dtype if opts.dtype != "auto" else ("bfloat16" if self._device.type == "cuda" else "float32")
        dtype = getattr(torch, dtype_name)
        kwargs: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code}
        if opts.revision:
            kwargs["revision"] = opts.revision
        gguf_file = None
        if self.model_path.endswith(".gguf"):  # transformers dequantizes GGUF (needs the gguf package)
            gguf_file = os.path.basename(self.model_path)
            source = os.path.dirname(self.model_path)
            kwargs["gguf_file"] = gguf_file
        else:
            source = self.model_path
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model_kwargs = dict(kwargs, dtype=dtype)
            if opts.attn_implementation:
                model_kwargs["attn_implementation"] = opts.attn_implementation
            self._model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs).to(self._device).eval()
        except Exception as exc:
            raise ModelLoadError(f"transformers could not load {self.model_path}: {type(exc).__name__}: {exc}") from exc
        tok = self._tokenizer
        self.adds_bos, self.chat_template, self.special_tokens = tokenizer_facts(tok)
        # transformers' GGUF tokenizer forgets tokenizer.ggml.add_bos_token: we add BOS ourselves.
        self._prepend_bos = bool(
            gguf_file and not self.adds_bos and tok.bos_token_id is not None and gguf_adds_bos(self.model_path)
        )
        if self._prepend_bos:
            self.adds_bos = True
        if gguf_file and not self.chat_template:
            self.chat_template = gguf_chat_template(self.model_path)
        gen_eos = getattr(self._model.generation_config, "eos_token_id", None)
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self._eos = {int(e) for e in [*eos, tok.eos_token_id] if e is not None}
        config_len = int(getattr(self._model.config, "max_position_embeddings", 0) or 0) or self.context_length
        self.max_model_len = opts.max_model_len or min(self.context_length, config_len)
        self.fused: list[str] = []
        if self._device.type == "cuda" and opts.fuse_kernels:
            with self._on_device():
                self._fuse()
        self.max_batch = opts.max_batch_size or (256 if self._device.type == "cuda" else 32)
        self.layout = self._choose_layout()
        if self.layout == "slots" and not opts.max_model_len:
            # Slots reserve max_model_len columns per sequence up front (like vLLM's KV cache).
            self.max_model_len = min(self.max_model_len, 4096)
        # The actor runs one thread per request; they wait here, not in the actor's queue.
        self.max_concurrency = max(self.max_batch * 2, 64)
        self._thread = threading.Thread(target=self._loop, name="xdask-transformers", daemon=True)
        self._thread.start()

    def _fuse(self) -> None:
        """Fused norm/rotary kernels, compiled now (not inside a graph capture); eager on any failure."""
        import torch

        from xdask.engines.transformers.fusion import fuse_small_kernels, unfuse

        try:
            self.fused = fuse_small_kernels(self._model)
            if self.fused:
                with torch.inference_mode():
                    # Decode shapes with 1 and several rows: the shapes dynamo specializes on.
                    for shape in ((2, 1), (1, 1)):
                        ids = torch.zeros(shape, dtype=torch.long, device=self._device)
                        self._model(input_ids=ids)
                    torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a speed-up must never cost the launch
            logger.warning("kernel fusion failed, running eagerly: %s", exc)
            self.fused = []
            unfuse(self._model)

    def _on_device(self) -> Any:
        """Make the model's GPU this thread's current CUDA device while the block runs.

        Streams, CUDA graphs and ``synchronize()`` use the thread's current
        device (cuda:0 unless set), not the model's: on ``cuda:1`` they would
        run on, and allocate a context on, a GPU booked for another replica
        (checked on two H100s: with this, a model on cuda:1 leaves GPU 0
        untouched). The current device is per thread, so other models are
        unaffected.
        """
        if self._device is None or self._device.type != "cuda":
            return contextlib.nullcontext()
        import torch

        return torch.cuda.device(self._device)

    def _choose_layout(self) -> str:
        wanted = self.options.kv_layout
        cfg = self._model.config
        sliding = any(t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or ())
        if wanted == "slots" and sliding:
            raise ModelLoadError("kv_layout=slots does not support models with sliding-window layers")
        if wanted == "auto":
            return "slots" if self._device.type == "cuda" and not sliding else "dynamic"
        return wanted

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._model = None
        self._tokenizer = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": str(self._device),
            "gpu_idx": self.gpu_idx,
            "dtype": str(getattr(self._model, "dtype", "")).replace("torch.", ""),
            "max_batch_size": getattr(self, "max_batch", None),
            "max_model_len": self.max_model_len,
            "batching": "continuous (xdask scheduler)",
            "kv_layout": self.layout,
            "fused_kernels": getattr(self, "fused", []),
            "cuda_graphs": self.layout == "slots" and self._device is not None and self._device.type == "cuda"
            and self.options.cuda_graphs,
        }

    # -- requests ----------------------------------------------------------------

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        if self._closed.is_set() or self._tokenizer is None:
            raise GenerationError("the model is closed")
        ids = self._tokenizer(prompt).input_ids
        if self._prepend_bos and (not ids or ids[0] != self._tokenizer.bos_token_id):
            ids = [self._tokenizer.bos_token_id, *ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)}",
                param="messages", code="context_length_exceeded",
            )
        req = _Request(ids=ids, params=params, emit=emit)
        self._inbox.put(req)
        while not req.done.wait(1.0):
            if self._closed.is_set() and not req.done.is_set():
                raise GenerationError("the model was closed while generating")
        if req.error is not None:
            raise req.error

    # -- scheduler thread ----------------------------------------------------------

    def _loop(self) -> None:
        with self._on_device():  # the scheduler thread drives the model: every step on its GPU
            self._serve()

    def _serve(self) -> None:
        import torch

        batch = self._new_batch()
        with torch.inference_mode():
            while not self._closed.is_set():
                self._drain_inbox(block=not self._running and not self._waiting)
                if self._closed.is_set():
                    break
                try:
                    admitted = self._admit(batch)
                    if self._running and not admitted:
                        self._decode(batch)
                except Exception as exc:  # a failing step fails its requests, not the engine
                    logger.exception("transformers step failed")
                    for req in self._running:
                        self._fail(req, GenerationError(f"{type(exc).__name__}: {exc}"))
                    self._running = []
                    batch = self._new_batch()
        for req in self._running + self._waiting:
            self._fail(req, GenerationError("the model was closed"))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._fail(item, GenerationError("the model was closed"))

    def _new_batch(self) -> Any:
        if self.layout == "slots":
            from xdask.engines.transformers.slots import SlotBatch

            return SlotBatch(self._model, self.max_batch, self.max_model_len, use_graphs=self.options.cuda_graphs)
        from xdask.engines.transformers.batch import Batch

        return Batch(self._device)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                return
            self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fail(self, req: _Request, exc: BaseException) -> None:
        req.error = exc
        req.finished = True
        req.done.set()

    def _row_sampling(self, params: SamplingParams) -> Any:
        import torch

        from xdask.engines.transformers.sampling import RowSampling

        temperature = params.temperature if params.temperature is not None else _DEFAULT_TEMPERATURE
        generator = None
        if params.seed is not None and temperature > 0:
            generator = torch.Generator(device=self._device)
            generator.manual_seed(int(params.seed))
        return RowSampling(
            temperature=float(temperature),
            top_p=float(params.top_p if params.top_p is not None else 1.0),
            presence_penalty=float(params.presence_penalty or 0.0),
            frequency_penalty=float(params.frequency_penalty or 0.0),
            generator=generator,
        )

    def _admit(self, batch: Any) -> bool:
        """Prefill waiting requests (as many as fit) and join them to the batch."""
        import torch

        from xdask.engines.transformers.batch import Batch

        room = self.max_batch - len(self._running)
        chosen: list[_Request] = []
        longest = 0
        while self._waiting and len(chosen) < room:
            nxt = self._waiting[0]
            width = max(longest, len(nxt.ids))
            if chosen and width * (len(chosen) + 1) > self.options.max_prefill_tokens:
                break
            chosen.append(self._waiting.pop(0))
            longest = width
        if not chosen:
            return False
        for r in chosen:
            r.sampling = self._row_sampling(r.params)
            r.detok = IncrementalDetokenizer(self._tokenizer)
            r.stop = StopMatcher(list(r.params.stop))
        if self.layout == "slots":
            logits = torch.stack([batch.admit(r.ids) for r in chosen])
            self.stats["prefills"] += len(chosen)
            tokens = self._sample(logits, chosen)
            for r, t in zip(chosen, tokens, strict=True):
                r.last = t
            self._running.extend(chosen)
            self._after_step(batch, tokens, start=len(self._running) - len(chosen))
            return True
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        rows = [[pad] * (longest - len(r.ids)) + r.ids for r in chosen]
        mask = [[0] * (longest - len(r.ids)) + [1] * len(r.ids) for r in chosen]
        input_ids = torch.tensor(rows, device=self._device)
        attn = torch.tensor(mask, device=self._device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        out = self._model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.stats["prefills"] += 1
        new = Batch(self._device)
        new.cache, new.mask = out.past_key_values, attn
        new.positions = positions[:, -1] + 1
        tokens = self._sample(out.logits[:, -1, :], chosen)
        new.last = torch.tensor(tokens, device=self._device)
        batch.join(new)
        self._running.extend(chosen)
        self._after_step(batch, tokens, start=len(self._running) - len(chosen))
        return True

    def _decode(self, batch: Any) -> None:
        if self.layout == "slots":
            logits = batch.decode([r.last for r in self._running])
            self.stats["steps"] += 1
            self.stats["max_rows"] = max(self.stats["max_rows"], batch.size)
            tokens = self._sample(logits, self._running)
            for r, t in zip(self._running, tokens, strict=True):
                r.last = t
            self._after_step(batch, tokens, start=0)
            return
        mask = batch.grow()
        out = self._model(input_ids=batch.last.unsqueeze(-1), attention_mask=mask,
                          position_ids=batch.positions.unsqueeze(-1), past_key_values=batch.cache, use_cache=True)
        batch.cache = out.past_key_values
        batch.positions = batch.positions + 1
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], batch.size)
        tokens = self._sample(out.logits[:, -1, :], self._running)
        import torch

        batch.last = torch.tensor(tokens, device=self._device)
        self._after_step(batch, tokens, start=0)

    def _sample(self, logits: Any, reqs: list[_Request]) -> list[int]:
        from xdask.engines.transformers.sampling import sample

        return sample(logits, [r.sampling for r in reqs], [r.generated for r in reqs])

    def _after_step(self, batch: Any, tokens: list[int], start: int) -> None:
        """Emit the new tokens of rows ``start..`` and drop the rows that finished."""
        rows = self._running[start:]
        for req, token in zip(rows, tokens, strict=True):
            self._advance(req, token)
        if any(r.finished for r in self._running):
            keep = [i for i, r in enumerate(self._running) if not r.finished]
            self._running = [self._running[i] for i in keep]
            batch.keep(keep)

    def _advance(self, req: _Request, token: int) -> None:
        """Account one sampled token of ``req``: text, stop checks, finish."""
        finish: str | None = None
        text = ""
        if token in self._eos:
            finish = "stop"
        else:
            req.generated.append(token)
            text, hit = req.stop.push(req.detok.add(token))
            if hit:
                finish = "stop"
            elif len(req.generated) >= req.params.max_tokens or len(req.ids) + len(req.generated) >= self.max_model_len:
                finish = "length"
        if finish is not None:
            if finish == "length":
                text += req.stop.push(req.detok.flush())[0] + req.stop.flush()
            self._finish(req, text, finish)
            return
        if text and req.emit(Delta(text=text)):
            req.finished = True  # the client is gone
            req.done.set()

    def _finish(self, req: _Request, text: str, finish: str) -> None:
        try:
            req.emit(Delta(text=text, finish_reason=finish, prompt_tokens=len(req.ids),
                           completion_tokens=len(req.generated)))
        finally:
            req.finished = True
            req.done.set()
