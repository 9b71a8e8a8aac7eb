"""Engine-agnostic logic of the audio endpoints: validated request in, OpenAI's response body out.

No Tornado here (the HTTP binding is ``xdask_server.audio``). Uploads must be
WAV (checked here from the first bytes, so an MP3 or a text file is a 400
before any model is asked; the worker decodes and resamples). A
transcription comes back from the engine as text, language, duration and
timed segments, and leaves in the format asked for:

* ``json``: ``{"text"}``; ``text``: the text alone;
* ``srt`` / ``vtt``: subtitles, one cue per segment;
* ``verbose_json``: ``{"task", "language", "duration", "text", "segments", "words"}``
  in OpenAI's shape. Whisper's pipeline reports no per-segment log
  probabilities, compression ratios or no-speech probabilities: those
  fields are null rather than made up.

Examples
--------
>>> segments = [{"id": 0, "start": 0.0, "end": 1.5, "text": "Hello."}]
>>> print(subtitles(segments, "srt"))
1
00:00:00,000 --> 00:00:01,500
Hello.
<BLANKLINE>
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xdask.api.media import SpeechRequest, TranscriptionForm
from xdask.engines.wav import check_wav
from xdask_server.serving import OpenAIServing
from xdask_server.stats import RequestStats

if TYPE_CHECKING:
    from xdask.cluster.supervisor import Supervisor

#: Content types of the speech formats.
SPEECH_CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}


def _clock(seconds: float, sep: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def subtitles(segments: list[dict[str, Any]], fmt: str) -> str:
    """SubRip (``srt``) or WebVTT (``vtt``) cues of timed segments."""
    sep = "," if fmt == "srt" else "."
    cues = []
    for i, seg in enumerate(segments, 1):
        times = f"{_clock(seg['start'], sep)} --> {_clock(seg['end'], sep)}"
        cues.append(f"{i}\n{times}\n{seg['text']}\n" if fmt == "srt" else f"{times}\n{seg['text']}\n")
    body = "\n".join(cues)
    return body if fmt == "srt" else f"WEBVTT\n\n{body}"


def verbose(task: str, result: dict[str, Any], form: TranscriptionForm) -> dict[str, Any]:
    """OpenAI's ``verbose_json`` body."""
    granularities = form.timestamp_granularities or ["segment"]
    body: dict[str, Any] = {"task": task, "language": result.get("language"), "duration": result["duration"],
                            "text": result["text"]}
    if "segment" in granularities:
        body["segments"] = [
            {"id": seg["id"], "seek": 0, "start": seg["start"], "end": seg["end"], "text": seg["text"],
             "tokens": [], "temperature": form.temperature, "avg_logprob": None, "compression_ratio": None,
             "no_speech_prob": None}
            for seg in result["segments"]
        ]
    if "word" in granularities:
        body["words"] = result.get("words", [])
    return body


class AudioServing:
    """Transcription, translation and speech requests against the models of a ``Supervisor``."""

    def __init__(self, supervisor: Supervisor, stats: RequestStats | None = None):
        self.supervisor = supervisor
        self.stats = stats if stats is not None else RequestStats()
        self._requests = OpenAIServing(supervisor, self.stats)

    async def _invoke(self, uid: str, endpoint: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._requests.invoke(uid, "audio", endpoint, op, payload)

    async def transcribe(self, op: str, form: TranscriptionForm, audio: bytes) -> tuple[str, str | dict[str, Any]]:
        """``(content type, body)`` of a transcription (``op="transcribe"``) or translation (``"translate"``)."""
        check_wav(audio)
        endpoint = "/v1/audio/translations" if op == "translate" else "/v1/audio/transcriptions"
        result = await self._invoke(form.model, endpoint, op, form.payload(audio))
        fmt = form.response_format
        if fmt == "json":
            return "application/json", {"text": result["text"]}
        if fmt == "verbose_json":
            return "application/json", verbose("translate" if op == "translate" else "transcribe", result, form)
        if fmt == "text":
            return "text/plain; charset=utf-8", result["text"] + "\n"
        return f"text/{'vtt' if fmt == 'vtt' else 'plain'}; charset=utf-8", subtitles(result["segments"], fmt)

    async def speech(self, req: SpeechRequest) -> tuple[str, bytes]:
        """``(content type, audio bytes)`` of ``POST /v1/audio/speech``."""
        result = await self._invoke(req.model, "/v1/audio/speech", "speech", req.payload())
        return SPEECH_CONTENT_TYPES[req.response_format], result["audio"]
