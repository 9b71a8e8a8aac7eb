"""Audio engine: speech recognition and synthesis on transformers pipelines.

The family's abilities decide what loads and which ops it serves:

* ``audio2text``: ``pipeline("automatic-speech-recognition")`` (Whisper, and
  CTC models such as wav2vec2) serves ``transcribe``; a multilingual Whisper
  also serves ``translate`` (Whisper's ``task="translate"``: speech in any
  of its languages to English text).
* ``text2audio``: ``pipeline("text-to-speech")`` (VITS / MMS-TTS, Bark, ...)
  serves ``speech``.

Models that transformers' pipelines do not load (ChatTTS, CosyVoice,
Kokoro, SenseVoice) fail their launch with the pipeline's reason. Speech
synthesis needs transformers 5.19 or later: 5.17's text-to-speech pipeline
calls ``BatchEncoding.to(dtype=...)`` on a tokenizer's output and fails on
every request, in float32 as in float16 (seen on an H100).

Payloads (``invoke(op, payload)``; see ``xdask_server.audio_serving``)::

    transcribe / translate  {"audio": <WAV bytes>, "language", "prompt", "temperature",
                             "timestamps": None | "segment" | "word"}
                  result    {"text", "language", "duration", "segments": [{"id", "start", "end", "text"}],
                             "words": [{"word", "start", "end"}] (word timestamps only)}
    speech                  {"input", "speed", "response_format": "wav" | "pcm"}
                  result    {"audio": <bytes>, "sampling_rate", "duration"}

WAV is decoded and resampled to the model's rate here, on the worker (the
server only checks the first bytes), so the server's CPU stays free for
requests. ``speed`` scales VITS's ``speaking_rate`` (passed to each call, the
shared model is not changed); for TTS models without one the samples are
resampled, which also shifts the pitch.

Examples
--------
>>> engine = make_engine(resolved, "/models/whisper-tiny", {"num_beams": 1})        # doctest: +SKIP
>>> engine.load()                                                                    # doctest: +SKIP
>>> engine.invoke("transcribe", {"audio": open("hello.wav", "rb").read()})["text"]  # doctest: +SKIP
'Hello.'
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import Field

from xdask.engines.torch_task import TorchTaskEngine, TorchTaskOptions, release
from xdask.engines.wav import decode_wav, encode_pcm, encode_wav, resample
from xdask.errors import GenerationError, InvalidRequestError, ModelLoadError
from xdask.registry.specs import ResolvedModel

logger = logging.getLogger(__name__)

ENGINE = "transformers"

#: OpenAI's ``pcm`` speech format: 16-bit mono at this rate.
PCM_RATE = 24000


class AudioOptions(TorchTaskOptions):
    """Launch options of the transformers audio engine."""

    #: Beam width of Whisper's decoding; None: the pipeline's default (5, as OpenAI's whisper).
    #: 1 (greedy) is several times faster on a CPU.
    num_beams: int | None = Field(default=None, ge=1, le=16)


def _whisper_language(value: str) -> str:
    """The ISO-639-1 code of a language Whisper knows, given a code or a name; 400 otherwise."""
    from transformers.models.whisper.tokenization_whisper import (
        LANGUAGES,
        TO_LANGUAGE_CODE,
    )

    key = value.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise InvalidRequestError(f"language {value!r} is not one Whisper knows: use an ISO-639-1 code "
                              "such as en, fr, de or zh", param="language")


def _short(exc: BaseException, limit: int = 400) -> str:
    """An exception's message cut to ``limit`` characters (some list every language Whisper knows)."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + " ..."


def _language_name(code_or_name: str | None) -> str | None:
    """Whisper's language name (``"english"``) for a code (``"en"``) or name; None stays None."""
    if not code_or_name:
        return None
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    value = code_or_name.strip().lower()
    return LANGUAGES.get(value, value)


class TransformersAudioEngine(TorchTaskEngine):
    """transformers' ASR or TTS pipeline behind ``TaskEngine`` (``transcribe``, ``translate``, ``speech``)."""

    engine = ENGINE
    options_class = AudioOptions
    options: AudioOptions

    def __init__(self, resolved: ResolvedModel, model_path: str, options: AudioOptions, gpu_idx: list[int] | None):
        super().__init__(resolved, model_path, options, gpu_idx)
        abilities = set(resolved.family.model_ability)
        if "audio2text" in abilities:
            self.task = "automatic-speech-recognition"
        elif "text2audio" in abilities:
            self.task = "text-to-speech"
        else:
            raise InvalidRequestError(f"{resolved.family.model_name} has neither audio2text nor text2audio: "
                                      "the transformers audio engine serves nothing else", param="model_name")
        self.sampling_rate = 16000
        self.whisper = False
        self._pipe: Any = None

    def load(self) -> None:
        """Load the pipeline on the booked device and decide the ops from what it is."""
        try:
            from transformers import pipeline
        except ImportError as exc:
            raise ModelLoadError(f"The audio engine needs transformers and torch: {exc}. "
                                 "pip install 'xdask[audio]'") from exc
        dtype = self.place()
        try:
            # transformers' pipeline overloads take Literal task names only, not a str chosen at run time.
            self._pipe = pipeline(  # type: ignore[call-overload]
                self.task, model=self.model_path, device=self.device, dtype=dtype
            )
        except Exception as exc:
            raise ModelLoadError(f"transformers' {self.task} pipeline could not load {self.model_path}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if self.task == "text-to-speech":
            self.sampling_rate = int(getattr(self._pipe, "sampling_rate", None) or 16000)
            self.ops = frozenset({"speech"})
            return
        self.sampling_rate = int(self._pipe.feature_extractor.sampling_rate)
        self.whisper = self._pipe.model.config.model_type == "whisper"
        ops = {"transcribe"}
        task_ids = getattr(self._pipe.model.generation_config, "task_to_id", None) or {}
        if self.whisper and getattr(self.resolved.family, "multilingual", False) and "translate" in task_ids:
            ops.add("translate")
        self.ops = frozenset(ops)

    def invoke(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Run ``op``; bad input is a 400, a failure inside the model a 500."""
        if op not in self.ops:
            raise InvalidRequestError(f"This model does not serve {op!r}", param="model", code="wrong_model_type")
        if op == "speech":
            return self._speech(payload)
        return self._recognize(op, payload)

    # -- speech recognition ---------------------------------------------------

    def _generate_kwargs(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {}
        if self.options.num_beams is not None:
            kwargs["num_beams"] = self.options.num_beams
        temperature = float(payload.get("temperature") or 0.0)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        if not self.whisper:
            return kwargs
        if payload.get("language"):
            kwargs["language"] = _whisper_language(payload["language"])
        if getattr(self._pipe.model.generation_config, "is_multilingual", False):
            kwargs["task"] = "translate" if op == "translate" else "transcribe"
        if payload.get("prompt"):
            ids = self._pipe.tokenizer.get_prompt_ids(payload["prompt"], return_tensors="np")
            kwargs["prompt_ids"] = torch.from_numpy(ids).to(self.device)
        return kwargs

    def _recognize(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        samples, rate = decode_wav(payload.get("audio") or b"")
        samples = resample(samples, rate, self.sampling_rate)
        duration = samples.size / self.sampling_rate
        timestamps = payload.get("timestamps")
        call: dict[str, Any] = {"generate_kwargs": self._generate_kwargs(op, payload)}
        if self.whisper:
            call["return_language"] = True
            if timestamps:
                call["return_timestamps"] = "word" if timestamps == "word" else True
        elif timestamps == "word":
            call["return_timestamps"] = "word"
        try:
            out = self._pipe({"raw": samples, "sampling_rate": self.sampling_rate}, **call)
        except ValueError as exc:  # an unknown language, word timestamps the model cannot give, ...
            raise InvalidRequestError(f"The model refused the request: {_short(exc)}") from exc
        except Exception as exc:
            raise GenerationError(f"Speech recognition failed: {type(exc).__name__}: {exc}") from exc
        text = str(out.get("text") or "").strip()
        chunks = out.get("chunks") or []
        language: str | None
        if op == "translate":
            language = "english"
        else:
            detected = next((c.get("language") for c in chunks if c.get("language")), None)
            language = _language_name(payload.get("language")) or detected
        result: dict[str, Any] = {"text": text, "language": language, "duration": round(duration, 3)}
        if timestamps == "word":
            result["words"] = [{"word": str(c.get("text", "")).strip(), **_span(c, 0.0, duration)}
                               for c in chunks]
            result["segments"] = [{"id": 0, "start": 0.0, "end": round(duration, 3), "text": text}]
        else:
            result["segments"] = _segments(chunks if timestamps else [], text, duration)
        return result

    # -- speech synthesis -------------------------------------------------------

    def _speech(self, payload: dict[str, Any]) -> dict[str, Any]:
        text = payload.get("input") or ""
        speed = float(payload.get("speed") or 1.0)
        base = getattr(self._pipe.model, "speaking_rate", None)  # VITS: its forward takes a speaking_rate
        forward = {"speaking_rate": base * speed} if base is not None and speed != 1.0 else {}
        try:
            out = self._pipe(text, forward_params=forward)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise InvalidRequestError(
                f"The model could not speak this input ({type(exc).__name__}: {_short(exc)}); a VITS voice "
                "drops characters outside its vocabulary, so text in another script leaves nothing to say",
                param="input") from exc
        samples = np.asarray(out["audio"], dtype=np.float32).reshape(-1)
        rate = int(out.get("sampling_rate") or self.sampling_rate)
        if base is None and speed != 1.0:  # no speaking-rate knob: play it faster or slower
            samples = resample(samples, rate, max(1, round(rate / speed)))
        if payload.get("response_format", "wav") == "pcm":
            return {"audio": encode_pcm(samples, rate, PCM_RATE), "sampling_rate": PCM_RATE,
                    "duration": round(samples.size / rate, 3)}
        return {"audio": encode_wav(samples, rate), "sampling_rate": rate, "duration": round(samples.size / rate, 3)}

    def close(self) -> None:
        self._pipe = None
        release(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pipeline": self.task, "sampling_rate": self.sampling_rate}


def _span(chunk: dict[str, Any], floor: float, duration: float) -> dict[str, float]:
    """A chunk's ``start``/``end`` in seconds; a missing one (a random or cut-off model) falls back to the bounds."""
    start, end = (chunk.get("timestamp") or (None, None))[:2]
    start = floor if start is None else min(float(start), duration)
    end = duration if end is None else min(float(end), duration)
    return {"start": round(start, 3), "end": round(max(start, end), 3)}


def _segments(chunks: list[dict[str, Any]], text: str, duration: float) -> list[dict[str, Any]]:
    """OpenAI-style segments from the pipeline's timestamped chunks (one segment without them)."""
    if not chunks:
        return [{"id": 0, "start": 0.0, "end": round(duration, 3), "text": text}]
    out = []
    floor = 0.0
    for i, chunk in enumerate(chunks):
        span = _span(chunk, floor, duration)
        out.append({"id": i, **span, "text": str(chunk.get("text", "")).strip()})
        floor = span["end"]
    return out


def make_engine(
    resolved: ResolvedModel, model_path: str, kwargs: dict[str, Any], gpu_idx: list[int] | None = None
) -> TransformersAudioEngine:
    """Build (not load) the engine (``TorchTaskEngine.build``)."""
    return TransformersAudioEngine.build(resolved, model_path, kwargs, gpu_idx)
