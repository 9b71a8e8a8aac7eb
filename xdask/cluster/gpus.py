"""Free memory of each GPU a worker may use, read with ``nvidia-smi`` (no CUDA context).

Placement compares a replica's estimated memory with these figures before it
books a GPU. Why ``nvidia-smi`` and not torch: reading memory through CUDA
would create a context on every GPU of the worker process (hundreds of MB
each, and on GPUs the process never otherwise touches).
"""

from __future__ import annotations

import os
import shutil
import subprocess


def _visible(entries: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list (indices or UUIDs), None when unset."""
    if entries is None:
        return None
    out = []
    for entry in entries.replace(" ", "").split(","):
        if not entry or entry.startswith("-"):
            break  # CUDA stops at the first invalid entry
        out.append(entry)
    return out


def gpu_free_memory() -> dict[int, int]:
    """GPU label (the ordinal this process would see) -> free bytes; empty without ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    physical: list[tuple[str, str, int]] = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
            physical.append((parts[0], parts[1], int(parts[2]) * 2**20))
    visible = _visible(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is None:
        return {i: free for i, (_, _, free) in enumerate(physical)}
    result = {}
    for label, entry in enumerate(visible):
        for index, uuid, free in physical:
            if entry in (index, uuid) or (entry.startswith("GPU-") and uuid.startswith(entry)):
                result[label] = free
    return result
