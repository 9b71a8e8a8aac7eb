"""HTTP binding of the audio API; the logic is ``xdask_server.audio_serving``.

* ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: multipart,
  exactly as OpenAI's client sends it (``file``, ``model``, ``language``,
  ``prompt``, ``response_format`` json | text | srt | verbose_json | vtt,
  ``temperature``, ``timestamp_granularities[]``); the file must be WAV
  (up to ``xdask.audio.max-upload-size`` bytes).
* ``POST /v1/audio/speech``: JSON (``model``, ``input``, ``voice``,
  ``response_format`` wav | pcm, ``speed``); the answer is the audio itself.

Examples
--------
>>> import openai                                                          # doctest: +SKIP
>>> oai = openai.OpenAI(base_url="http://127.0.0.1:9997/v1", api_key="x")
>>> oai.audio.transcriptions.create(model="whisper-tiny", file=open("hello.wav", "rb")).text
'Hello.'
>>> oai.audio.speech.create(model="mms-tts-eng", input="Hello", voice="any", response_format="wav").content[:4]
b'RIFF'
"""

from __future__ import annotations

import json

from tornado import web

from xdask.api.media import SpeechRequest, TranscriptionForm
from xdask_server.audio_serving import AudioServing
from xdask_server.base import TaskHandler
from xdask_server.forms import UploadHandler


class _AudioHandler:
    """Mixin: the app's ``AudioServing``."""

    @property
    def audio(self) -> AudioServing:
        return self.application.settings["audio"]  # type: ignore[attr-defined]


class TranscriptionsHandler(_AudioHandler, UploadHandler):
    """``POST /v1/audio/transcriptions``: speech to text in its own language."""

    limit_key = "audio.max-upload-size"
    op = "transcribe"

    async def post(self) -> None:
        form = await self.form()
        req = TranscriptionForm.model_validate(form.fields)
        audio = form.file("file")
        done, answer = await self.run(self.audio.transcribe(self.op, req, audio or b""))
        if not done or answer is None:
            return
        content_type, body = answer
        self.set_header("Content-Type", content_type)
        self.finish(json.dumps(body) if isinstance(body, dict) else body)


class TranslationsHandler(TranscriptionsHandler):
    """``POST /v1/audio/translations``: speech to English text."""

    op = "translate"


class SpeechHandler(_AudioHandler, TaskHandler):
    """``POST /v1/audio/speech``: text to audio bytes."""

    async def post(self) -> None:
        req = self.parse(SpeechRequest)
        done, answer = await self.run(self.audio.speech(req))
        if not done or answer is None:
            return
        content_type, audio = answer
        self.set_header("Content-Type", content_type)
        self.finish(audio)


def routes() -> list[tuple[str, type[web.RequestHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [
        (r"/v1/audio/transcriptions", TranscriptionsHandler),
        (r"/v1/audio/translations", TranslationsHandler),
        (r"/v1/audio/speech", SpeechHandler),
    ]
