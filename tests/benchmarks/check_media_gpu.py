"""The image and audio engines in-process on a GPU (booked as gpu_idx=[0]) with the tiny models: no server, no cluster.

Builds the tiny Stable Diffusion, Whisper and VITS of ``tests/support/tiny_media_models.py``
in a temporary folder, runs each op and prints what it saw as JSON: device
and dtype, same seed -> same bytes, word timestamps, translation, speech,
GPU memory before loading and after ``close`` (cuBLAS/cuDNN workspaces live
in torch's allocator, so the baseline is taken after a warm-up). Needs torch
with CUDA, transformers, diffusers, pydantic, dask (for ``xdask.config``).
Writes results/check-media-gpu.json (the same report).

    python tests/benchmarks/check_media_gpu.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import harness


def resolved(cls: Any, name: str, abilities: list[str], path: str, **kw: Any) -> Any:
    """A one-spec family of ``cls`` whose weights are the folder ``path``."""
    from xdask.registry.specs import ResolvedModel

    fam = cls(model_name=name, model_ability=abilities,
              model_specs=[{"model_format": "pytorch", "quantizations": ["none"], "model_uri": path}], **kw)
    return ResolvedModel(family=fam, spec=fam.model_specs[0], quantization="none")


def step(out: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one check into ``out[name]``; a failure is recorded with its traceback and the next step runs."""
    t0 = time.time()
    try:
        out[name] = {"ok": True, "result": fn(), "s": round(time.time() - t0, 3)}
    except Exception as exc:  # noqa: BLE001  (a report: every step runs, failures are printed)
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600], "tb": traceback.format_exc()[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_result_argument(parser, "check-media-gpu")
    args = parser.parse_args()

    import torch
    from support.tiny_media_models import build_tiny_sd, build_tiny_vits, build_tiny_whisper, tone_wav

    from xdask.engines.audio import make_engine as make_audio
    from xdask.engines.image import make_engine as make_image
    from xdask.errors import XdaskError
    from xdask.registry.specs import AudioFamily, ImageFamily

    m = tempfile.mkdtemp(prefix="xdask-media-gpu-")
    build_tiny_sd(f"{m}/sd")
    build_tiny_whisper(f"{m}/whisper")
    build_tiny_vits(f"{m}/vits")
    cuda = torch.cuda.is_available()
    if cuda:  # the baseline: cuBLAS/cuDNN workspaces live in torch's allocator too
        x = torch.randn(64, 64, device="cuda:0", dtype=torch.float16)
        (x @ x).sum().item()
        conv = torch.nn.Conv2d(4, 4, 3).cuda().half()
        conv(torch.randn(1, 4, 8, 8, device="cuda:0", dtype=torch.float16)).sum().item()
        del x, conv
    out: dict[str, Any] = {"baseline_mem": torch.cuda.memory_allocated() if cuda else 0, "torch": torch.__version__,
                           "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None}

    def tone(seconds: float = 2.0, rate: int = 44100) -> bytes:
        return tone_wav(seconds, rate)

    def image() -> dict[str, Any]:
        e = make_image(resolved(ImageFamily, "sd", ["text2image", "image2image"], f"{m}/sd"), f"{m}/sd", {},
                       gpu_idx=[0])
        e.load()
        d = e.describe()
        params = {"prompt": "a fox", "n": 2, "width": 64, "height": 96, "seed": 3, "num_inference_steps": 4}
        a = e.invoke("text_to_image", params)
        b = e.invoke("text_to_image", params)
        c = e.invoke("image_to_image", {"prompt": "a dog", "image": a["images"][0], "num_inference_steps": 4,
                                        "seed": 1, "strength": 0.5})
        mem = torch.cuda.memory_allocated()
        e.close()
        return {"describe": d, "size": [a["width"], a["height"]], "same_seed_same_bytes": a["images"] == b["images"],
                "two_differ": a["images"][0] != a["images"][1], "i2i_size": [c["width"], c["height"]],
                "png": a["images"][0][:4].hex(), "mem_loaded": mem, "mem_after_close": torch.cuda.memory_allocated()}

    def image_fp32_and_errors() -> dict[str, Any]:
        r: dict[str, Any] = {}
        try:
            make_image(resolved(ImageFamily, "sd", ["text2image"], f"{m}/sd"), f"{m}/sd", {"device": "cuda:1"},
                       gpu_idx=[0])
        except XdaskError as exc:
            r["wrong_device"] = f"{exc.status}: {exc.message}"
        e = make_image(resolved(ImageFamily, "sd", ["text2image"], f"{m}/sd"), f"{m}/sd", {"dtype": "float32"},
                       gpu_idx=[0])
        e.load()
        r["fp32"] = e.describe()
        e.invoke("text_to_image", {"prompt": "x", "width": 64, "height": 64})
        e.close()
        cpu = make_image(resolved(ImageFamily, "sd", ["text2image"], f"{m}/sd"), f"{m}/sd", {}, gpu_idx=[])
        cpu.load()
        r["cpu_replica"] = cpu.describe()
        cpu.close()
        return r

    def whisper() -> dict[str, Any]:
        fam = resolved(AudioFamily, "w", ["audio2text"], f"{m}/whisper", multilingual=True)
        e = make_audio(fam, f"{m}/whisper", {"num_beams": 1}, gpu_idx=[0])
        e.load()
        r: dict[str, Any] = {"describe": e.describe()}
        for name, op, p in [("json", "transcribe", {}),
                            ("segments", "transcribe", {"timestamps": "segment", "language": "fr"}),
                            ("words", "transcribe", {"timestamps": "word", "prompt": "hello there"}),
                            ("sampled", "transcribe", {"temperature": 0.5}),
                            ("translate", "translate", {"timestamps": "segment"})]:
            res = e.invoke(op, {"audio": tone(), **p})
            r[name] = ({k: (v if k != "text" else type(v).__name__) for k, v in res.items()
                        if k not in ("segments", "words")}
                       | {"n_segments": len(res["segments"]), "n_words": len(res.get("words", []))})
        beam = make_audio(fam, f"{m}/whisper", {}, gpu_idx=[0])
        beam.load()
        t0 = time.time()
        beam.invoke("transcribe", {"audio": tone()})
        r["beam5_s"] = round(time.time() - t0, 3)
        beam.close()
        e.close()
        r["mem_after_close"] = torch.cuda.memory_allocated() if cuda else 0
        return r

    def vits_fp16() -> int:
        e = make_audio(resolved(AudioFamily, "v", ["text2audio"], f"{m}/vits"), f"{m}/vits", {"dtype": "float16"},
                       gpu_idx=[0])
        e.load()
        return e.invoke("speech", {"input": "hello world"})["sampling_rate"]

    def vits() -> dict[str, Any]:
        e = make_audio(resolved(AudioFamily, "v", ["text2audio"], f"{m}/vits"), f"{m}/vits", {}, gpu_idx=[0])
        e.load()
        r: dict[str, Any] = {"describe": e.describe()}
        a = e.invoke("speech", {"input": "hello world"})
        p = e.invoke("speech", {"input": "hello world", "response_format": "pcm", "speed": 2.0})
        r.update(wav_head=a["audio"][:4].decode(), wav_rate=a["sampling_rate"], pcm_rate=p["sampling_rate"],
                 pcm_len=len(p["audio"]))
        e.close()
        return r

    for name, fn in [("image", image), ("image_fp32_and_errors", image_fp32_and_errors), ("whisper", whisper),
                     ("vits", vits), ("vits_fp16", vits_fp16)]:
        step(out, name, fn)
    print(json.dumps(out, indent=1, default=str))
    harness.write_result(args.result, json.loads(json.dumps(out, default=str)), benchmark="check-media-gpu",
                         packages=["torch", "transformers", "diffusers"], settings={"models": "tiny SD, Whisper, VITS"})


if __name__ == "__main__":
    main()
