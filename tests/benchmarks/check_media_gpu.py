"""The image and audio engines in-process on a GPU (booked as gpu_idx=[0]) with the tiny models: no server, no cluster.

Builds the tiny Stable Diffusion, Whisper and VITS of ``tests/tiny_media_models.py``
in a temporary folder, runs each op and prints what it saw as JSON: device
and dtype, same seed -> same bytes, word timestamps, translation, speech,
GPU memory before loading and after ``close`` (cuBLAS/cuDNN workspaces live
in torch's allocator, so the baseline is taken after a warm-up). Needs torch
with CUDA, transformers, diffusers, pydantic, dask (for ``xdask.config``).

    python tests/benchmarks/check_media_gpu.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_media_models import (
    build_tiny_sd,
    build_tiny_vits,
    build_tiny_whisper,
    tone_wav,
)

from xdask.engines.audio import make_engine as make_audio
from xdask.engines.image import make_engine as make_image
from xdask.errors import XdaskError
from xdask.registry.specs import AudioFamily, ImageFamily, ResolvedModel

M = tempfile.mkdtemp(prefix="xdask-media-gpu-")
build_tiny_sd(f"{M}/sd")
build_tiny_whisper(f"{M}/whisper")
build_tiny_vits(f"{M}/vits")
if torch.cuda.is_available():  # the baseline: cuBLAS/cuDNN workspaces live in torch's allocator too
    x = torch.randn(64, 64, device="cuda:0", dtype=torch.float16)
    (x @ x).sum().item()
    conv = torch.nn.Conv2d(4, 4, 3).cuda().half()
    conv(torch.randn(1, 4, 8, 8, device="cuda:0", dtype=torch.float16)).sum().item()
    del x, conv
BASE = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
out = {"baseline_mem": BASE, "torch": torch.__version__, "cuda": torch.cuda.is_available(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

def resolved(cls, name, abilities, path, **kw):
    fam = cls(model_name=name, model_ability=abilities, model_specs=[{"model_format": "pytorch", "quantizations": ["none"], "model_uri": path}], **kw)
    return ResolvedModel(family=fam, spec=fam.model_specs[0], quantization="none")

def tone(seconds=2.0, rate=44100):
    return tone_wav(seconds, rate)

def step(name, fn):
    t0 = time.time()
    try:
        out[name] = {"ok": True, "result": fn(), "s": round(time.time() - t0, 3)}
    except Exception as exc:  # noqa: BLE001  (a report: every step runs, failures are printed)
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600], "tb": traceback.format_exc()[-1500:]}

def image():
    e = make_image(resolved(ImageFamily, "sd", ["text2image", "image2image"], f"{M}/sd"), f"{M}/sd", {}, gpu_idx=[0])
    e.load()
    d = e.describe()
    a = e.invoke("text_to_image", {"prompt": "a fox", "n": 2, "width": 64, "height": 96, "seed": 3, "num_inference_steps": 4})
    b = e.invoke("text_to_image", {"prompt": "a fox", "n": 2, "width": 64, "height": 96, "seed": 3, "num_inference_steps": 4})
    c = e.invoke("image_to_image", {"prompt": "a dog", "image": a["images"][0], "num_inference_steps": 4, "seed": 1, "strength": 0.5})
    mem = torch.cuda.memory_allocated()
    e.close()
    return {"describe": d, "size": [a["width"], a["height"]], "same_seed_same_bytes": a["images"] == b["images"],
            "two_differ": a["images"][0] != a["images"][1], "i2i_size": [c["width"], c["height"]],
            "png": a["images"][0][:4].hex(), "mem_loaded": mem, "mem_after_close": torch.cuda.memory_allocated()}

def image_fp32_and_errors():
    r = {}
    try:
        make_image(resolved(ImageFamily, "sd", ["text2image"], f"{M}/sd"), f"{M}/sd", {"device": "cuda:1"}, gpu_idx=[0])
    except XdaskError as exc:
        r["wrong_device"] = f"{exc.status}: {exc.message}"
    e = make_image(resolved(ImageFamily, "sd", ["text2image"], f"{M}/sd"), f"{M}/sd", {"dtype": "float32"}, gpu_idx=[0])
    e.load()
    r["fp32"] = e.describe()
    e.invoke("text_to_image", {"prompt": "x", "width": 64, "height": 64})
    e.close()
    cpu = make_image(resolved(ImageFamily, "sd", ["text2image"], f"{M}/sd"), f"{M}/sd", {}, gpu_idx=[])
    cpu.load()
    r["cpu_replica"] = cpu.describe()
    cpu.close()
    return r

def whisper():
    e = make_audio(resolved(AudioFamily, "w", ["audio2text"], f"{M}/whisper", multilingual=True), f"{M}/whisper", {"num_beams": 1}, gpu_idx=[0])
    e.load()
    r = {"describe": e.describe()}
    for name, op, p in [("json", "transcribe", {}), ("segments", "transcribe", {"timestamps": "segment", "language": "fr"}),
                        ("words", "transcribe", {"timestamps": "word", "prompt": "hello there"}),
                        ("sampled", "transcribe", {"temperature": 0.5}), ("translate", "translate", {"timestamps": "segment"})]:
        res = e.invoke(op, {"audio": tone(), **p})
        r[name] = {k: (v if k != "text" else type(v).__name__) for k, v in res.items() if k not in ("segments", "words")} | {"n_segments": len(res["segments"]), "n_words": len(res.get("words", []))}
    beam = make_audio(resolved(AudioFamily, "w", ["audio2text"], f"{M}/whisper", multilingual=True), f"{M}/whisper", {}, gpu_idx=[0])
    beam.load()
    t0 = time.time()
    beam.invoke("transcribe", {"audio": tone()})
    r["beam5_s"] = round(time.time() - t0, 3)
    beam.close()
    e.close()
    r["mem_after_close"] = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return r

def vits_fp16():
    e = make_audio(resolved(AudioFamily, "v", ["text2audio"], f"{M}/vits"), f"{M}/vits", {"dtype": "float16"}, gpu_idx=[0])
    e.load()
    return e.invoke("speech", {"input": "hello world"})["sampling_rate"]

def vits():
    e = make_audio(resolved(AudioFamily, "v", ["text2audio"], f"{M}/vits"), f"{M}/vits", {}, gpu_idx=[0])
    e.load()
    r = {"describe": e.describe()}
    a = e.invoke("speech", {"input": "hello world"})
    p = e.invoke("speech", {"input": "hello world", "response_format": "pcm", "speed": 2.0})
    r.update(wav_head=a["audio"][:4].decode(), wav_rate=a["sampling_rate"], pcm_rate=p["sampling_rate"], pcm_len=len(p["audio"]))
    e.close()
    return r

step("image", image)
step("image_fp32_and_errors", image_fp32_and_errors)
step("whisper", whisper)
step("vits", vits)
step("vits_fp16", vits_fp16)
print(json.dumps(out, indent=1, default=str))
