"""Which NVIDIA GPUs this process may use, and how much memory each has free.

One module, because four places must agree on it: the local cluster (how
many GPUs to split among its workers), a worker's host facts (the engine
matrix: is there CUDA here?), placement (free memory per GPU label) and the
engines (mapping a booked ordinal to a ``CUDA_VISIBLE_DEVICES`` entry for a
child process). If they read the variable differently, placement books a GPU
that an engine cannot see.

CUDA's rule for ``CUDA_VISIBLE_DEVICES``: unset, every GPU is visible; set,
its comma-separated entries (indices, ``GPU-``/``MIG-`` UUIDs or unique
prefixes of them) are read left to right and the list ends at the first
invalid entry: ``-1``, an empty entry, garbage, or a device that does not
exist. So ``""`` and ``"-1"`` hide every GPU, and ``"0,-1,1"`` shows only
device 0. ``visible_devices`` applies the rule's syntax; the queries here
also stop at an entry that names no device ``nvidia-smi`` lists.

Why ``nvidia-smi`` and not torch: asking CUDA would create a context on every
GPU of the worker process (hundreds of MB each, and on GPUs the process never
otherwise touches), and the server may have no torch at all.

Examples
--------
>>> visible_devices("0,-1,1")
['0']
>>> visible_devices("-1")
[]
>>> visible_devices(None) is None
True
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

#: The variable CUDA (and the libraries that mirror it) reads at initialisation.
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

_GPU_LINE = re.compile(r"^GPU (\d+):.*?(?:\(UUID: (GPU-[^)\s]+)\))?\s*$")
_MIG_LINE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)")


@dataclass(frozen=True)
class Device:
    """One CUDA device as ``nvidia-smi`` lists it."""

    #: ``nvidia-smi``'s index (None for a MIG instance, which CUDA names by UUID only).
    index: int | None
    #: ``GPU-...`` or ``MIG-...``; ``""`` when the tool did not print one.
    uuid: str
    #: Free memory in bytes, where the query asked for it.
    free_bytes: int | None = None

    def named_by(self, entry: str) -> bool:
        """Whether the ``CUDA_VISIBLE_DEVICES`` entry ``entry`` names this device.

        Examples
        --------
        >>> Device(1, "GPU-bbbb-2222").named_by("GPU-bbbb"), Device(1, "GPU-bbbb-2222").named_by("0")
        (True, False)
        """
        if entry.isdigit():
            return self.index == int(entry)
        return bool(self.uuid) and self.uuid.startswith(entry)


def _well_formed(entry: str) -> bool:
    return (entry.isascii() and entry.isdigit()) or entry.startswith(("GPU-", "MIG-"))


def visible_devices(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: its entries up to the first invalid one; None when unset.

    Entries are stripped of spaces and passed on verbatim (an index or a
    UUID). Whether an entry names a device that exists is a question for the
    device list (``visible``); this is the part that needs no driver.

    Examples
    --------
    >>> visible_devices(" 4 , GPU-aa,MIG-7f")
    ['4', 'GPU-aa', 'MIG-7f']
    >>> visible_devices(""), visible_devices("0,garbage,1"), visible_devices("1,,2")
    ([], ['0'], ['1'])
    """
    if value is None:
        return None
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not _well_formed(entry):
            break
        out.append(entry)
    return out


def visible(devices: Sequence[Device], value: str | None) -> list[Device]:
    """The devices of this machine that a process with ``CUDA_VISIBLE_DEVICES=value`` sees, in its order.

    Position ``i`` of the result is CUDA ordinal ``i`` in that process (the
    GPU label placement books). Unset shows every GPU (MIG instances only
    when named); the list ends at the first entry no device answers to.

    Examples
    --------
    >>> gpus = [Device(0, "GPU-aaaa"), Device(1, "GPU-bbbb")]
    >>> [d.index for d in visible(gpus, "1,0")], [d.index for d in visible(gpus, "0,5,1")]
    ([1, 0], [0])
    """
    entries = visible_devices(value)
    if entries is None:
        return [d for d in devices if d.index is not None]
    out: list[Device] = []
    for entry in entries:
        device = next((d for d in devices if d.named_by(entry)), None)
        if device is None:
            break
        out.append(device)
    return out


def _nvidia_smi(*args: str) -> str | None:
    """``nvidia-smi``'s output, or None where the tool is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def list_devices() -> list[Device]:
    """Every GPU (and MIG instance) of this machine, from ``nvidia-smi -L``; empty without the tool."""
    devices: list[Device] = []
    for line in (_nvidia_smi("-L") or "").splitlines():
        if gpu := _GPU_LINE.match(line):
            devices.append(Device(int(gpu.group(1)), gpu.group(2) or ""))
        elif mig := _MIG_LINE.match(line):
            devices.append(Device(None, mig.group(1)))
    return devices


def detect_gpu_count() -> int:
    """NVIDIA GPUs this process may use: ``nvidia-smi -L``, narrowed by ``CUDA_VISIBLE_DEVICES``.

    Why both: ``nvidia-smi`` lists every GPU of the machine whatever
    ``CUDA_VISIBLE_DEVICES`` says, while CUDA (and so every engine) sees only
    the listed ones; a worker started with ``CUDA_VISIBLE_DEVICES=1`` owns one
    GPU. Without ``nvidia-smi`` it is 0, since the variable alone does not
    prove a GPU.
    """
    return len(visible(list_devices(), os.environ.get(CUDA_VISIBLE_DEVICES)))


def gpu_free_memory() -> dict[int, int]:
    """GPU label (the ordinal this process would see) -> free bytes; empty without ``nvidia-smi``.

    Placement compares a replica's estimated memory with these figures before
    it books a GPU.
    """
    out = _nvidia_smi("--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits")
    devices = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
            devices.append(Device(int(parts[0]), parts[1], int(parts[2]) * 2**20))
    seen = visible(devices, os.environ.get(CUDA_VISIBLE_DEVICES))
    return {label: d.free_bytes for label, d in enumerate(seen) if d.free_bytes is not None}


__all__ = [
    "CUDA_VISIBLE_DEVICES",
    "Device",
    "detect_gpu_count",
    "gpu_free_memory",
    "list_devices",
    "visible",
    "visible_devices",
]
