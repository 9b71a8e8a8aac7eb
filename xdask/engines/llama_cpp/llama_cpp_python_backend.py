"""llama-cpp-python backend: concurrent requests decoded together, one ``llama_decode`` a step.

``Llama.create_completion`` decodes one sequence at a time and is not
thread-safe, so this backend drives llama.cpp through llama-cpp-python's
low-level (ctypes) bindings instead, the way llama.cpp's own server does:

* the context holds ``n_parallel`` sequences (``n_seq_max``) in one KV
  buffer of ``n_ctx`` cells, each allowed its share (a *slot*);
* one scheduler thread owns the context. Each step it admits waiting
  requests into free slots, builds one batch with the next token of every
  running sequence plus prompt chunks of newly admitted ones, decodes it
  once and samples every sequence with its own sampler chain;
* caller threads (one per request, blocked in ``generate``) only enqueue
  and wait; the scheduler hands each its text and the caller calls
  ``emit``, so a slow consumer never stalls decoding;
* a finished or cancelled sequence's KV cells are removed and its slot is
  reused; requests beyond ``n_parallel`` wait in arrival order.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from xdask.engines.base import Delta, Emit, SamplingParams
from xdask.engines.llama_cpp.gguf_engine import GGUFEngineBase
from xdask.engines.llama_cpp.options import LlamaCppOptions, padded_split
from xdask.engines.text import StopMatcher
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

#: llama-cpp-python's own default is 0.8; OpenAI's (which clients expect) is 1.
_OPENAI_DEFAULT_TEMPERATURE = 1.0
#: Sampling settings OpenAI has no parameter for (``top_k``, ``min_p``) or
#: leaves unset (``top_p``): llama.cpp's defaults, the ones its server (our
#: xllamacpp backend) and ``Llama.create_completion`` use, so both backends
#: sample alike. ``top_k`` also keeps each draw off Gemma's 262k-token vocab.
_TOP_K = 40
_MIN_P = 0.05
_DEFAULT_TOP_P = 0.95
#: Prompt tokens prefilled in one decode step at most (llama.cpp's default
#: ``n_batch``): a long prompt is chunked so running sequences keep streaming.
_PREFILL_CHUNK = 512
#: Requests the model actor may hand over at once per slot; the rest of a
#: burst waits in the actor, not in a thread each.
_QUEUE_PER_SLOT = 4

#: ggml's log levels (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4; CONT 5 goes on
#: the previous line). llama.cpp warns about model quirks a user cannot act on
#: ("control-looking token"), so its warnings are our info.
_LLAMA_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_llama_logger = logging.getLogger(f"{__name__}.llama")
_log_route_lock = threading.Lock()
_log_callback: Any = None  # held here: llama.cpp keeps only the C pointer


def _route_llama_log(lib: Any) -> None:
    """Send llama.cpp's log to Python logging, once per process.

    llama-cpp-python installs a callback that maps ggml's level numbers one
    off (warnings count as errors), so every model load prints to stderr
    whatever its verbosity; this one replaces it, for the whole process.
    """
    global _log_callback
    with _log_route_lock:
        if _log_callback is not None:
            return
        last = [logging.DEBUG]

        def log(level: int, text: bytes, _user_data: Any) -> None:
            last[0] = last[0] if level == 5 else _LLAMA_LOG_LEVELS.get(level, logging.DEBUG)
            message = (text or b"").decode("utf-8", "replace").rstrip("\n")
            if message and _llama_logger.isEnabledFor(last[0]):
                _llama_logger.log(last[0], "%s", message)

        _log_callback = lib.llama_log_callback(log)
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))


@dataclass(eq=False)
class _Sequence:
    """One ``generate`` call, as the scheduler and its caller thread share it."""

    prompt: list[int]
    params: SamplingParams
    #: Scheduler -> caller: ``Delta`` (the last has ``finish_reason``) or an exception.
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    #: Set by the caller when ``emit`` says the consumer is gone.
    cancelled: bool = False
    # Owned by the scheduler thread from admission on:
    slot: int = -1
    sampler: Any = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    next_token: int | None = None  # sampled, to be decoded next step
    n_batched: int = 0  # its tokens in the batch being decoded
    i_batch: int = -1  # where its logits are in that batch, -1 if none
    completion_tokens: int = 0
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    stop: StopMatcher | None = None


class LlamaCppPythonEngine(GGUFEngineBase):
    """A GGUF model served by llama-cpp-python, with continuous batching.

    Examples
    --------
    >>> options = LlamaCppOptions(n_ctx=8192, n_parallel=4, n_threads=2, n_gpu_layers=0)  # doctest: +SKIP
    >>> eng = LlamaCppPythonEngine("/path/model.gguf", options)
    >>> eng.load()
    >>> eng.generate("Hello", SamplingParams(max_tokens=8), print)
    >>> eng.close()
    """

    backend: ClassVar[str] = "llama-cpp-python"

    def __init__(self, model_path: str, options: LlamaCppOptions):
        n_parallel = max(1, options.n_parallel)
        super().__init__(model_path, options, max_concurrency=max(64, _QUEUE_PER_SLOT * n_parallel))
        self._n_parallel = n_parallel
        self._lib: Any = None  # the llama_cpp module, once loaded
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._n_batch = 0
        self._n_vocab = 0
        self._n_ctx_seq = 0
        self._pieces: dict[int, bytes] = {}
        # _cond guards _waiting, _free_slots and _closing.
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # scheduler thread only
        self._free_slots: list[int] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        # Serializes tokenizing (caller threads) with freeing the model (close).
        self._model_lock = threading.Lock()
        #: Sequences in the running batch now, and the most seen at once.
        self.active = 0
        self.max_active = 0
        #: Decode steps run (each one ``llama_decode``).
        self.steps = 0

    # -- lifecycle ------------------------------------------------------------------

    def load(self) -> None:
        try:
            import llama_cpp as lib
        except ImportError as exc:
            raise ModelLoadError("llama-cpp-python is not installed") from exc
        _route_llama_log(lib)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        layers = self.options.offload_layers
        mparams.n_gpu_layers = 0x7FFFFFFF if layers < 0 else layers
        split = self.options.split
        shares = None  # the C array tensor_split points to: it must outlive the load call
        if split is not None:
            mparams.main_gpu = split.main_gpu
            mparams.split_mode = getattr(lib, split.mode_constant)
            if split.tensor_split:
                size = lib.llama_max_devices()
                shares = (ctypes.c_float * size)(*padded_split(split.tensor_split, size))
                mparams.tensor_split = shares
        model = lib.llama_model_load_from_file(self.model_path.encode("utf-8"), mparams)
        if not model:
            raise ModelLoadError(f"llama-cpp-python could not load {self.model_path}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.options.n_ctx
        cparams.n_seq_max = self._n_parallel
        # A step holds one token per running sequence plus a prompt chunk;
        # llama.cpp splits it into ubatches of its default size.
        cparams.n_batch = _PREFILL_CHUNK + self._n_parallel
        cparams.n_threads = cparams.n_threads_batch = self.options.n_threads
        # One KV buffer for all sequences. Split per-sequence buffers attend a
        # little less (a 16-sequence step at 1,000 tokens each: 62 vs 71 ms),
        # but llama.cpp puts only sequences with consecutive ids, in ascending
        # order, into one ubatch: with slots {0, 2, 4, 6} busy a step took 2.3x
        # as long, and with 16 in descending order 3.5x (llama.cpp issue 25840).
        # A sequence still gets at most n_ctx / n_parallel cells (checked here).
        cparams.kv_unified = True
        # Sliding-window layers (Gemma 3) keep only their window, as llama.cpp's
        # server does: nothing here rewinds a sequence, which a full cache allows.
        cparams.swa_full = False
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise ModelLoadError(
                f"llama-cpp-python could not create a context of {self.options.n_ctx} tokens "
                f"for {self._n_parallel} sequences on {self.model_path}"
            )
        self._lib, self._model, self._ctx = lib, model, ctx
        self._vocab = lib.llama_model_get_vocab(model)
        self._memory = lib.llama_get_memory(ctx)
        self._n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self._n_ctx_seq = lib.llama_n_ctx(ctx) // self._n_parallel
        self._n_batch = lib.llama_n_batch(ctx)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._free_slots = list(range(self._n_parallel))
        self._thread = threading.Thread(target=self._loop, name=f"llama-cpp-python:{self.model_path}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()  # it fails what is still queued or running
        with self._model_lock:
            lib = self._lib
            if lib is None:  # never loaded, or closed already
                return
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ctx)
            lib.llama_model_free(self._model)
            self._lib = self._model = self._ctx = self._vocab = self._memory = self._batch = None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "n_ctx_per_slot": self._n_ctx_seq or self.options.n_ctx // self._n_parallel,
            "active_sequences": self.active,
            "waiting": len(self._waiting),
        }

    # -- caller threads ---------------------------------------------------------------

    def generate(self, prompt: str, params: SamplingParams, emit: Emit) -> None:
        seq = _Sequence(prompt=self._tokenize(prompt), params=params)
        if len(seq.prompt) >= self._n_ctx_seq:
            raise InvalidRequestError(
                f"The prompt is {len(seq.prompt)} tokens; a sequence of this model holds "
                f"{self._n_ctx_seq} (n_ctx {self.options.n_ctx} over {self._n_parallel} parallel slots), "
                "prompt and completion together",
                param="messages",
            )
        if params.max_tokens < 1:
            emit(Delta(text="", finish_reason="length", prompt_tokens=len(seq.prompt), completion_tokens=0))
            return
        with self._cond:
            if self._closing:
                raise GenerationError("the model is closed")
            self._waiting.append(seq)
            self._cond.notify_all()
        try:
            while True:
                items = [seq.out.get()]
                # Whatever piled up while emit ran goes out as one delta.
                while True:
                    try:
                        items.append(seq.out.get_nowait())
                    except queue.Empty:
                        break
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                last = items[-1]
                text = "".join(d.text for d in items)
                if last.finish_reason is not None:
                    emit(Delta(text=text, finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                               completion_tokens=last.completion_tokens))
                    return
                if emit(Delta(text=text)):
                    return
        finally:
            seq.cancelled = True  # a no-op once finished; otherwise the scheduler frees the slot

    def _tokenize(self, prompt: str) -> list[int]:
        data = prompt.encode("utf-8")
        with self._model_lock:
            lib = self._lib
            if lib is None:
                raise GenerationError("the model is not loaded or is closed")
            size = len(data) + 2
            buf = (lib.llama_token * size)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, size, True, True)
            if n < 0:  # more tokens than bytes + 2 (cannot happen with BPE/SPM, but cheap to handle)
                size = -n
                buf = (lib.llama_token * size)()
                n = lib.llama_tokenize(self._vocab, data, len(data), buf, size, True, True)
        if n < 0:
            raise InvalidRequestError("The prompt could not be tokenized", param="messages")
        if n == 0:
            raise InvalidRequestError("The prompt is empty", param="messages")
        return list(buf[:n])

    # -- scheduler thread ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._closing:
                        break
                    admitted = self._admit()
                for seq in admitted:
                    self._start(seq)
                self._step()
        except BaseException as exc:  # a bug or a llama.cpp failure: no caller may hang on it
            logger.exception("llama-cpp-python scheduler of %s failed", self.model_path)
            with self._cond:
                self._closing = True  # first, so that no new request waits for a dead loop
            self._fail_all(GenerationError(f"llama-cpp-python scheduler failed: {exc}"))
            return
        self._fail_all(GenerationError("the model is closed"))

    def _admit(self) -> list[_Sequence]:
        """Waiting sequences given a free slot, in arrival order (holds ``_cond``)."""
        admitted = []
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            seq.slot = self._free_slots.pop()
            admitted.append(seq)
        return admitted

    def _start(self, seq: _Sequence) -> None:
        seq.sampler = self._make_sampler(seq.params)
        seq.stop = StopMatcher(list(seq.params.stop))
        self._running.append(seq)
        self.active = len(self._running)
        self.max_active = max(self.max_active, self.active)

    def _step(self) -> None:
        """One ``llama_decode`` for every running sequence, then one token each."""
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)
        if not self._running:
            return
        lib, batch = self._lib, self._batch
        # Decoding sequences get one token each; prompts (in arrival order) the room left.
        room = self._n_batch - sum(seq.next_token is not None for seq in self._running)
        for seq in self._running:
            if seq.next_token is not None:
                seq.n_batched = 1
            else:
                seq.n_batched = max(0, min(room, len(seq.prompt) - seq.n_past))
                room -= seq.n_batched
        n = 0
        for seq in self._running:
            seq.i_batch = -1
            if seq.next_token is not None:
                self._put(n, seq.next_token, seq.n_past, seq.slot, True)
                seq.i_batch = n
                n += 1
            elif seq.n_batched:
                for j, tok in enumerate(seq.prompt[seq.n_past : seq.n_past + seq.n_batched]):
                    self._put(n + j, tok, seq.n_past + j, seq.slot, False)
                n += seq.n_batched
                if seq.n_past + seq.n_batched == len(seq.prompt):  # the prompt's last token: sample after it
                    batch.logits[n - 1] = 1
                    seq.i_batch = n - 1
        if n == 0:
            return
        batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, batch)
        self.steps += 1
        if rc != 0:
            error = GenerationError(f"llama_decode returned {rc}")
            for seq in [s for s in self._running if s.n_batched]:
                self._release(seq)  # first: a caller that sees the error sees the slot free
                seq.out.put(error)
            return
        for seq in list(self._running):
            seq.n_past += seq.n_batched
            if seq.i_batch >= 0:
                seq.next_token = None
                self._accept(seq, lib.llama_sampler_sample(seq.sampler, self._ctx, seq.i_batch))

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Turn a sampled token into text, or end the sequence."""
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            text, _ = self._text(seq, b"", final=True)
            self._finish(seq, "stop", text)
            return
        seq.completion_tokens += 1
        text, hit = self._text(seq, self._piece(token), final=False)
        if hit:
            self._finish(seq, "stop", text)
        elif seq.completion_tokens >= seq.params.max_tokens or seq.n_past >= self._n_ctx_seq:
            # Out of tokens or out of cells for this sequence: the token is not decoded.
            tail, hit = self._text(seq, b"", final=True)
            self._finish(seq, "stop" if hit else "length", text + tail)
        else:
            if text:
                seq.out.put(Delta(text=text))
            seq.next_token = token

    def _text(self, seq: _Sequence, piece: bytes, final: bool) -> tuple[str, bool]:
        """New text (whole UTF-8 characters, stop strings cut) and whether one was hit."""
        assert seq.stop is not None
        text, hit = seq.stop.push(seq.utf8.decode(piece, final))
        if final and not hit:
            text += seq.stop.flush()
        return text, hit

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            lib = self._lib
            buf = ctypes.create_string_buffer(64)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def _finish(self, seq: _Sequence, reason: str, text: str) -> None:
        self._release(seq)
        seq.out.put(Delta(text=text, finish_reason=reason, prompt_tokens=len(seq.prompt),
                          completion_tokens=seq.completion_tokens))

    def _release(self, seq: _Sequence) -> None:
        """Forget the sequence's KV cells and sampler; its slot takes the next request."""
        lib = self._lib
        lib.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)  # a whole sequence: never fails
        if seq.sampler is not None:
            lib.llama_sampler_free(seq.sampler)
            seq.sampler = None
        self._running.remove(seq)
        self.active = len(self._running)
        with self._cond:
            self._free_slots.append(seq.slot)

    def _fail_all(self, error: GenerationError) -> None:
        for seq in list(self._running):
            self._release(seq)
            seq.out.put(error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            seq.out.put(error)

    def _make_sampler(self, params: SamplingParams) -> Any:
        """A sampler chain for one sequence: penalties, then greedy or top-k/top-p/min-p/temp/dist."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        presence, frequency = params.presence_penalty or 0.0, params.frequency_penalty or 0.0
        if presence or frequency:
            # Over every generated token, as OpenAI counts them (prompt tokens are not penalized).
            last_n = min(params.max_tokens, self._n_ctx_seq)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                self._n_vocab, last_n, 1.0, frequency, presence))
        temperature = params.temperature if params.temperature is not None else _OPENAI_DEFAULT_TEMPERATURE
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        top_p = params.top_p if params.top_p is not None else _DEFAULT_TOP_P
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(_TOP_K))
        if top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(_MIN_P, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
        seed = params.seed if params.seed is not None else lib.LLAMA_DEFAULT_SEED  # default: a random seed
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain
