"""Pydantic schemas of the image and audio requests (OpenAI's shapes, plus Xinference's and xdask's extras).

JSON bodies (``/v1/images/generations``, ``/v1/audio/speech``) are strict like
every xdask request (``"5"`` is not a number). Multipart forms
(``/v1/images/edits``, ``/v1/audio/transcriptions``, ...) carry every value
as text, so their schemas convert (``"2"`` is 2). Unknown fields are ignored,
as OpenAI-compatible servers do; Xinference's clients put their extras in a
``kwargs`` field holding a JSON object, which is merged in (the request's
own fields win).

Examples
--------
>>> req = ImageGenerationRequest.model_validate({"model": "sd", "prompt": "a fox", "size": "512x768"})
>>> req.dimensions(), req.response_format
((512, 768), 'url')
>>> TranscriptionForm.model_validate({"model": "whisper", "temperature": "0.2"}).temperature
0.2
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from xdask import config
from xdask.api.base import FORM as _FORM
from xdask.api.base import MAX_MODEL_NAME
from xdask.api.base import STRICT as _JSON
from xdask.api.base import invalid as _invalid

#: Longest prompt of an image request, in characters (OpenAI's for gpt-image-1).
MAX_IMAGE_PROMPT = 32000
#: Longest input of /v1/audio/speech, in characters (OpenAI's limit).
MAX_SPEECH_INPUT = 4096
#: Speech formats xdask writes without ffmpeg.
SPEECH_FORMATS = ("wav", "pcm")

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[x*X×]\s*(\d{1,5})\s*$")


def merge_kwargs(data: Any) -> Any:
    """Xinference's ``kwargs`` (a JSON object, or its text) merged under the body's own fields."""
    if not isinstance(data, dict) or data.get("kwargs") in (None, ""):
        return data
    extra = data["kwargs"]
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            raise _invalid("kwargs must be a JSON object") from None
    if not isinstance(extra, dict):
        raise _invalid("kwargs must be a JSON object")
    return {**extra, **{k: v for k, v in data.items() if k != "kwargs"}}


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"WIDTHxHEIGHT"`` (or ``W*H``) as ints within ``xdask.image`` limits; None for ``"auto"`` or nothing.

    Examples
    --------
    >>> parse_size("1024*768"), parse_size("auto")
    ((1024, 768), None)
    """
    if size is None or size.strip().lower() in ("", "auto"):
        return None
    low, high = int(config.get("image.min-side")), int(config.get("image.max-side"))
    rule = f"'WIDTHxHEIGHT' with each side a multiple of 8 from {low} to {high}, or 'auto'"
    match = _SIZE_RE.match(size)
    if not match:
        raise _invalid(f"{size!r} is not a size: use {rule}")
    width, height = int(match.group(1)), int(match.group(2))
    if any(side % 8 or not low <= side <= high for side in (width, height)):
        raise _invalid(f"{width}x{height} is not supported: use {rule}")
    return width, height


class _WithKwargs(BaseModel):
    """Merges Xinference's ``kwargs`` field into the body before validation."""

    @model_validator(mode="before")
    @classmethod
    def _merge_kwargs(cls, data: Any) -> Any:
        return merge_kwargs(data)


class _ImageFields(_WithKwargs):
    """What generation and edits share: OpenAI's fields and the diffusion knobs xdask adds."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    prompt: str = Field(max_length=MAX_IMAGE_PROMPT)
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    #: xdask: image i is drawn with seed + i; the same request gives the same images.
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0)
    negative_prompt: str | None = Field(default=None, max_length=MAX_IMAGE_PROMPT)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise _invalid("must not be empty")
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        parse_size(value)
        return value

    def dimensions(self) -> tuple[int, int] | None:
        """(width, height), or None: the model's own size."""
        return parse_size(self.size)

    def payload(self) -> dict[str, Any]:
        """The image engine's payload (``xdask.engines.image``), less any uploaded image."""
        width, height = self.dimensions() or (None, None)
        return {
            "prompt": self.prompt, "n": self.n, "width": width, "height": height, "seed": self.seed,
            "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
        }


class ImageGenerationRequest(_ImageFields):
    """``POST /v1/images/generations`` (JSON)."""

    model_config = _JSON


class ImageEditForm(_ImageFields):
    """``POST /v1/images/edits`` / ``variations`` (multipart): the fields beside the ``image`` file.

    ``strength`` (xdask): how far from the input image the result may go (0-1,
    the pipeline's default when absent); ``size`` absent keeps the image's own
    size, rounded down to multiples of 8.
    """

    model_config = _FORM
    strength: float | None = Field(default=None, gt=0.0, le=1.0)

    def payload(self) -> dict[str, Any]:
        return {**super().payload(), "strength": self.strength}


class TranscriptionForm(_WithKwargs):
    """``POST /v1/audio/transcriptions`` and ``/translations`` (multipart): the fields beside ``file``."""

    model_config = _FORM
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    language: str | None = Field(default=None, max_length=64)
    prompt: str | None = Field(default=None, max_length=4096)
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["word", "segment"]] = Field(default_factory=list)
    stream: bool = False

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise _invalid("streamed transcriptions are not supported: leave stream unset")
        return value

    def timestamps(self) -> str | None:
        """What the engine must time: ``"word"``, ``"segment"`` or nothing (the format needs no times)."""
        if self.response_format == "verbose_json":
            return "word" if "word" in self.timestamp_granularities else "segment"
        return "segment" if self.response_format in ("srt", "vtt") else None

    def payload(self, audio: bytes) -> dict[str, Any]:
        """The audio engine's ``transcribe``/``translate`` payload (``xdask.engines.audio``)."""
        return {"audio": audio, "language": self.language or None, "prompt": self.prompt or None,
                "temperature": self.temperature, "timestamps": self.timestamps()}


class SpeechRequest(_WithKwargs):
    """``POST /v1/audio/speech`` (JSON). ``voice`` is accepted and ignored by single-voice models.

    ``response_format`` defaults to ``wav`` (OpenAI's default, mp3, needs an
    encoder xdask does not ship); ``stream`` is accepted and the whole audio
    is sent at once.
    """

    model_config = _JSON
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    input: str = Field(max_length=MAX_SPEECH_INPUT)
    voice: str | dict[str, Any] | None = None
    response_format: str = "wav"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream: bool = False

    @field_validator("input")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise _invalid("must not be empty")
        return value

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in SPEECH_FORMATS:
            raise _invalid(f"{value!r} is not supported: xdask writes speech as {' or '.join(SPEECH_FORMATS)} "
                           "(mp3, opus, aac and flac need an encoder it does not ship)")
        return value

    def payload(self) -> dict[str, Any]:
        """The audio engine's ``speech`` payload."""
        return {"input": self.input, "speed": self.speed, "response_format": self.response_format}
