"""The GPUs placement booked for a model replica, as each engine must see them.

Placement (``xdask.cluster``) books GPU indices for every model replica on a
Dask worker: ``[1]``, ``[2, 3]``, ``[]`` for a CPU replica (``n_gpu=0``), or
``None`` when nothing was placed (direct in-process use, benchmarks), which
keeps each engine's own defaults. The indices are ordinals of the CUDA devices
*as the worker process sees them*: positions in the worker's own
``CUDA_VISIBLE_DEVICES``, or physical ids when it is unset.

Why two mechanisms:

* Several models live in one worker process, and CUDA reads
  ``CUDA_VISIBLE_DEVICES`` once, when it initialises. Changing it afterwards
  moves nothing in this process and misleads every library that reads it
  again, so in-process engines select their device explicitly (``cuda:1``,
  llama.cpp's ``main_gpu``) and never touch the variable.
* Engines that start processes of their own (vLLM's engine core, SGLang's
  scheduler) cannot be handed a device: their children pick devices by
  ordinal from what they see. A child reads the variable when it starts, so
  ``spawn_env`` sets it to the booked devices, translated into this
  process's own list (``cuda_visible_devices``), for the duration of that
  start only.

Examples
--------
>>> cuda_visible_devices([1], base="4,5")
'5'
>>> cuda_visible_devices([0, 2], base="GPU-aa, GPU-bb, GPU-cc")
'GPU-aa,GPU-cc'
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence

from xdask.engines.host import CUDA_VISIBLE_DEVICES, visible_devices
from xdask.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# os.environ is one per process: two engines starting at once in one worker
# must not see (or restore) each other's value.
_spawn_lock = threading.Lock()


def normalize_gpu_idx(gpu_idx: Sequence[int] | None) -> list[int] | None:
    """``gpu_idx`` as a list of distinct non-negative ints (None stays None); 400 otherwise.

    Every engine's ``make_engine`` calls this, so direct callers get the same
    checks as a launch through placement.

    Examples
    --------
    >>> normalize_gpu_idx((2, 3))
    [2, 3]
    >>> normalize_gpu_idx(None) is None
    True
    """
    if gpu_idx is None:
        return None
    try:
        idx = [int(i) for i in gpu_idx]
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"gpu_idx must be a list of GPU indices, not {gpu_idx!r}", param="gpu_idx") from exc
    if any(i < 0 for i in idx) or len(set(idx)) != len(idx):
        raise InvalidRequestError(f"gpu_idx must list distinct non-negative GPU indices, not {idx}", param="gpu_idx")
    return idx


def cuda_visible_devices(gpu_idx: list[int], base: str | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a child process exactly ``gpu_idx``.

    ``gpu_idx`` are ordinals in this process's view; a child resolves the
    variable against the physical devices, so each ordinal is mapped through
    ``base`` (default: this process's ``CUDA_VISIBLE_DEVICES``), read as CUDA
    reads it (``host.visible_devices``: up to its first invalid entry). Its
    entries may be ids or UUIDs (``GPU-...``, ``MIG-...``) and are passed on verbatim.
    With ``base`` unset the ordinals are physical ids already. ``[]`` gives
    ``""``: no GPU at all. An ordinal this process cannot see is a 400, since
    placement (or a user's ``gpu_idx``) named a device the worker does not have.

    Examples
    --------
    >>> cuda_visible_devices([2, 3], base="0,1,2,3")
    '2,3'
    >>> cuda_visible_devices([0], base="3,-1,4")
    '3'
    >>> cuda_visible_devices([2], base="0,1")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    xdask.errors.InvalidRequestError: GPU index 2 is not a device of this worker:
    it sees 2 GPU(s) (CUDA_VISIBLE_DEVICES='0,1'), so indices run from 0 to 1
    """
    if base is None:
        base = os.environ.get(CUDA_VISIBLE_DEVICES)
    entries = visible_devices(base)
    for i in gpu_idx:
        if i < 0 or (entries is not None and i >= len(entries)):
            seen = "none" if not entries else f"from 0 to {len(entries) - 1}"
            raise InvalidRequestError(
                f"GPU index {i} is not a device of this worker: it sees {len(entries or ())} GPU(s) "
                f"({CUDA_VISIBLE_DEVICES}={base!r}), so indices run {seen}",
                param="gpu_idx",
            )
    return ",".join(str(i) if entries is None else entries[i] for i in gpu_idx)


def _pin_own_cuda_view() -> None:
    """Make this process read ``CUDA_VISIBLE_DEVICES`` now, before ``spawn_env`` narrows it.

    CUDA reads the variable when it first initialises. If that happened
    inside ``spawn_env`` (an engine's start touching CUDA in this process),
    this process would see only one replica's GPUs for the rest of its life,
    and every other model in the worker with it. Counting devices initialises
    the driver without creating a context (no GPU memory is used).
    """
    try:
        import torch
    except ImportError:
        return
    torch.cuda.is_available()


@contextlib.contextmanager
def spawn_env(gpu_idx: list[int] | None) -> Iterator[str | None]:
    """Show child processes started inside this block only the GPUs in ``gpu_idx``.

    Sets ``CUDA_VISIBLE_DEVICES`` to ``cuda_visible_devices(gpu_idx)`` and
    restores the previous value (or unsets it) on exit, under one
    process-wide lock held for the whole block: an engine's start (which may
    take minutes, vLLM waits for its engine core to load the model) is
    serialized with other starts in this process. A process that another
    thread starts meanwhile without this lock inherits the narrowed value
    too; xdask starts engine processes only through here.

    ``None`` (nothing placed) changes nothing. ``[]`` sets the variable to
    ``""``, hiding every GPU, which is what "no GPU booked" means for a
    child. No engine passes ``[]`` today: vLLM's CUDA build and SGLang refuse
    a CPU replica with a 400 before starting (a child with no GPU would only
    fail later and less clearly), and vLLM's CPU build passes ``None`` since
    it has no GPU to hide.

    Yields the value set (None for a no-op).

    Examples
    --------
    >>> with spawn_env([0]):                                  # doctest: +SKIP
    ...     engine = AsyncLLM.from_engine_args(args)          # its engine core sees GPU 0 only
    """
    if gpu_idx is None:
        yield None
        return
    _pin_own_cuda_view()
    with _spawn_lock:
        previous = os.environ.get(CUDA_VISIBLE_DEVICES)
        value = cuda_visible_devices(gpu_idx, previous)
        os.environ[CUDA_VISIBLE_DEVICES] = value
        try:
            yield value
        finally:
            if previous is None:
                os.environ.pop(CUDA_VISIBLE_DEVICES, None)
            else:
                os.environ[CUDA_VISIBLE_DEVICES] = previous


def require_gpus(engine: str, gpu_idx: list[int]) -> None:
    """400 when an engine that only runs on GPUs was placed without one (``n_gpu=0``)."""
    if not gpu_idx:
        raise InvalidRequestError(
            f"The {engine} engine needs a GPU here, but this replica was placed without one (n_gpu=0); "
            "launch it with n_gpu >= 1, or use an engine that runs on the CPU",
            param="n_gpu",
        )


def parallel_size(
    gpu_idx: list[int],
    explicit: int | None,
    other: int,
    *,
    engine: str,
    option: str,
    other_option: str,
) -> int:
    """The tensor-parallel size of a replica on the GPUs ``gpu_idx``.

    The replica uses ``tensor × other`` GPUs (``other``: pipeline or data
    parallel size). Unset, the tensor size fills the booked GPUs. Set
    explicitly, it wins, unless it needs more GPUs than were booked: those
    would belong to other replicas, so that is a 400 that says why. Using
    fewer than booked is allowed (logged), since it takes nobody's GPU.

    Examples
    --------
    >>> parallel_size([0, 1], None, 1, engine="vllm", option="tensor_parallel_size",
    ...               other_option="pipeline_parallel_size")
    2
    """
    booked = len(gpu_idx)
    if explicit is None:
        if booked % other:
            raise InvalidRequestError(
                f"The {booked} GPU(s) booked for this {engine} replica ({gpu_idx}) cannot be divided by "
                f"{other_option}={other}; launch with n_gpu a multiple of {other}",
                param=other_option, code="invalid_engine_option",
            )
        return max(1, booked // other)
    needed = explicit * other
    if needed > booked:
        factors = f"{option}={explicit}" + (f" x {other_option}={other}" if other > 1 else "")
        raise InvalidRequestError(
            f"{factors} needs {needed} GPUs, but this {engine} replica has {booked} booked ({gpu_idx}); "
            f"launch it with n_gpu={needed}, or leave {option} unset to use the booked GPUs",
            param=option, code="invalid_engine_option",
        )
    if needed < booked:
        logger.warning(
            "%s: %s=%d uses %d of the %d GPUs booked (%s)", engine, option, explicit, needed, booked, gpu_idx
        )
    return explicit
