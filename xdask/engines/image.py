"""Image engine: text-to-image and image-to-image on a diffusers pipeline.

The model folder is anything ``AutoPipelineForText2Image`` (or, for
pipelines it does not map, ``DiffusionPipeline``) loads: Stable Diffusion
1.x/2.x/XL/3.x, FLUX, ... The family's abilities decide the ops:
``text2image`` gives ``text_to_image``; ``image2image`` gives
``image_to_image`` when ``AutoPipelineForImage2Image.from_pipe`` finds the
matching pipeline (same weights, no second copy in memory).

Payloads (``invoke(op, payload)``; see ``xdask_server.image_serving``)::

    text_to_image   {"prompt", "n", "width", "height", "seed", "num_inference_steps",
                     "guidance_scale", "negative_prompt"}            (all but prompt optional)
    image_to_image  the same + {"image": <PNG/JPEG/WebP bytes>, "strength"}
    result          {"images": [<PNG bytes>, ...], "seeds": [int, ...], "width", "height"}

Every call runs on a shallow copy of the pipeline with its own scheduler:
diffusers keeps per-call state on the pipeline object (timesteps in the
scheduler, guidance scale, ...), so calls sharing one object would corrupt
each other once ``max_concurrency`` > 1. The copy shares the weights.
Image ``i`` of a request with seed ``s`` is drawn from a CPU generator
seeded ``s + i``: the same request gives the same bytes on the same device.

Examples
--------
>>> engine = make_engine(resolved, "/models/sd-turbo", {"dtype": "float16"}, gpu_idx=[0])   # doctest: +SKIP
>>> engine.load()                                                                           # doctest: +SKIP
>>> out = engine.invoke("text_to_image", {"prompt": "a red fox", "width": 512, "height": 512})  # doctest: +SKIP
>>> out["images"][0][:8]                                                                    # doctest: +SKIP
b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import copy
import io
import logging
import random
from typing import Any

from pydantic import Field

from xdask.engines.torch_task import TorchTaskEngine, TorchTaskOptions, release
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

ENGINE = "diffusers"

#: Family ability -> the op it serves.
_ABILITY_OPS = {"text2image": "text_to_image", "image2image": "image_to_image"}

#: Keys of a payload passed to the pipeline call as they are.
_CALL_KEYS = ("num_inference_steps", "guidance_scale", "negative_prompt", "strength")


class ImageOptions(TorchTaskOptions):
    """Launch options of the diffusers engine."""

    #: Weight variant to load (``"fp16"`` repos ship ``*.fp16.safetensors``); None: the default files.
    variant: str | None = None
    #: diffusers' attention slicing: less memory at large sizes for a little speed.
    attention_slicing: bool = False
    #: Largest width x height a request may ask for on this model (0: the server's limits only).
    max_pixels: int = Field(default=0, ge=0)


class DiffusersEngine(TorchTaskEngine):
    """A diffusers pipeline behind ``TaskEngine`` (``text_to_image``, ``image_to_image``)."""

    engine = ENGINE
    options_class = ImageOptions
    options: ImageOptions

    def __init__(self, resolved: ResolvedModel, model_path: str, options: ImageOptions, gpu_idx: list[int] | None):
        super().__init__(resolved, model_path, options, gpu_idx)
        abilities = resolved.family.model_ability
        self.ops = frozenset(op for ability, op in _ABILITY_OPS.items() if ability in abilities)
        self._pipes: dict[str, Any] = {}

    def load(self) -> None:
        """Load the pipeline on the booked device; derive the image-to-image pipeline from it."""
        try:
            import torch  # noqa: F401
            from diffusers import (
                AutoPipelineForImage2Image,
                AutoPipelineForText2Image,
                DiffusionPipeline,
            )
        except ImportError as exc:
            raise ModelLoadError(f"The diffusers engine needs diffusers and torch: {exc}. "
                                 "pip install 'xdask[image]'") from exc
        family_dtype = getattr(self.resolved.family, "default_model_config", {}).get("torch_dtype")
        kwargs: dict[str, Any] = {"dtype": self.place(family_dtype)}
        if self.options.variant:
            kwargs["variant"] = self.options.variant
        try:
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(self.model_path, **kwargs)
            except ValueError:  # a pipeline AutoPipeline does not map: load it as it declares itself
                pipe = DiffusionPipeline.from_pretrained(self.model_path, **kwargs)
            pipe = pipe.to(self.device)
        except Exception as exc:
            raise ModelLoadError(f"diffusers could not load {self.model_path}: {type(exc).__name__}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        if self.options.attention_slicing:
            pipe.enable_attention_slicing()
        self._pipes["text_to_image"] = pipe
        if "image_to_image" in self.ops:
            try:
                self._pipes["image_to_image"] = AutoPipelineForImage2Image.from_pipe(pipe)
                self._pipes["image_to_image"].set_progress_bar_config(disable=True)
            except ValueError as exc:  # the family claims it, the pipeline has no image-to-image twin
                logger.warning("%s: no image-to-image pipeline for %s (%s); serving text_to_image only",
                               self.model_path, type(pipe).__name__, exc)
                self.ops = self.ops - {"image_to_image"}
        if not self.ops:
            raise ModelLoadError(f"{self.resolved.family.model_name} has none of the abilities the diffusers "
                                 f"engine serves ({', '.join(_ABILITY_OPS)})")

    def invoke(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Run ``op``; bad input is a 400, anything else the pipeline raises a 500."""
        import torch

        pipe = self._pipes.get(op)
        if pipe is None:
            raise InvalidRequestError(f"This model does not serve {op!r}", param="model", code="wrong_model_type")
        call = self._call_args(op, payload)
        n = int(payload.get("n") or 1)
        seed = payload.get("seed")
        seed = int(seed) if seed is not None else random.randrange(2**31)
        seeds = [(seed + i) % 2**63 for i in range(n)]
        call["num_images_per_prompt"] = n
        call["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        try:
            with torch.inference_mode():
                images = self._fresh(pipe)(**call).images
        except (ValueError, TypeError) as exc:  # the pipeline's own input checks
            raise InvalidRequestError(f"The pipeline refused the request: {exc}") from exc
        except Exception as exc:
            raise GenerationError(f"Image generation failed: {type(exc).__name__}: {exc}") from exc
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        width, height = images[0].size
        return {"images": out, "seeds": seeds, "width": width, "height": height}

    def _call_args(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The pipeline call's arguments: the family's defaults, then the request's values."""
        defaults = dict(getattr(self.resolved.family, "default_generate_config", {}) or {})
        call: dict[str, Any] = {k: v for k, v in defaults.items() if k in _CALL_KEYS}
        call.update({k: payload[k] for k in _CALL_KEYS if payload.get(k) is not None})
        call["prompt"] = payload["prompt"]
        width, height = payload.get("width"), payload.get("height")
        if op == "image_to_image":
            call["image"] = self._input_image(payload.get("image"), width, height)
        elif width and height:
            call["width"], call["height"] = int(width), int(height)
        if width and height and self.options.max_pixels and width * height > self.options.max_pixels:
            raise InvalidRequestError(f"size {width}x{height} is over this model's max_pixels "
                                      f"({self.options.max_pixels})", param="size")
        if op == "text_to_image":
            call.pop("strength", None)
        return call

    @staticmethod
    def _input_image(data: Any, width: int | None, height: int | None) -> Any:
        """The uploaded image as RGB, at the requested size or its own rounded down to multiples of 8."""
        from PIL import Image, UnidentifiedImageError

        if not isinstance(data, bytes | bytearray) or not data:
            raise InvalidRequestError("image is required: an uploaded PNG, JPEG or WebP file", param="image")
        try:
            image: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile; convert() below gives an Image
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise InvalidRequestError(f"image is not an image file this server can read: {exc}",
                                      param="image", code="invalid_image") from exc
        image = image.convert("RGB")
        if width and height:
            size = (int(width), int(height))
        else:
            size = (max(8, image.width // 8 * 8), max(8, image.height // 8 * 8))
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    @staticmethod
    def _fresh(pipe: Any) -> Any:
        """A copy of ``pipe`` that shares its modules (the weights) but not its per-call state.

        diffusers' own ``from_pipe`` does the same but re-casts every module
        and logs a warning for each, on every request.
        """
        clone = copy.copy(pipe)
        clone.scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
        return clone

    def close(self) -> None:
        self._pipes.clear()
        release(self.device)

    def describe(self) -> dict[str, Any]:
        pipe = self._pipes.get("text_to_image")
        return {**super().describe(), "pipeline": type(pipe).__name__ if pipe is not None else None}


def make_engine(
    resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any], gpu_idx: list[int] | None = None
) -> DiffusersEngine:
    """Build (not load) the engine (``TorchTaskEngine.build``)."""
    return DiffusersEngine.build(resolved, model_path, kwargs, gpu_idx)
