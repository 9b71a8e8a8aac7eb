"""Free GPU memory per worker label, read from ``nvidia-smi``.

``nvidia-smi`` cannot exist on this CPU machine, so a stand-in script prints
what ``nvidia-smi --query-gpu=index,uuid,memory.free --format=csv,noheader,nounits``
prints on a two-GPU host (the format was checked on an H100 host).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xdask.engines.host import gpu_free_memory

MiB = 2**20


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\nprintf '0, GPU-aaaa-1111, 1000\\n1, GPU-bbbb-2222, 2000\\n'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")


def test_labels_follow_cuda_visible_devices(fake_smi: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_free_memory() == {0: 1000 * MiB, 1: 2000 * MiB}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_free_memory() == {0: 2000 * MiB}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,0")
    assert gpu_free_memory() == {0: 2000 * MiB, 1: 1000 * MiB}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_free_memory() == {}


def test_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_free_memory() == {}
