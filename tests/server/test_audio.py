"""Audio API through a real ``xdask-local`` and the official ``openai`` client, with tiny transformers models.

A multilingual Whisper and a VITS voice with random weights are built
offline (``support.tiny_media_models``), registered as custom audio families
pointing at their folders (``model_uri``) and launched on the transformers
engine. A random Whisper says nonsense: the tests check types and structure
(formats, timings, languages, errors), not words.

The module runs its own server (``support.media_server``). Whisper is launched with
``num_beams=1``: the pipeline's default beam of 5 is several times slower.
"""

from __future__ import annotations

import io
import json
import re
import struct
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.media_server import MediaServer, media_server
from support.servers import engine_required
from support.tiny_media_models import tone_wav

if not engine_required("transformers"):  # CI installs it: there a missing one fails
    pytest.importorskip("transformers", reason="pip install 'xdask[audio]'")

pytestmark = pytest.mark.slow

ASR = "tiny-whisper"
TTS = "tiny-vits"


def audio_family(name: str, folder: Path, ability: str, multilingual: bool = True) -> dict:
    return {"model_name": name, "model_ability": [ability], "multilingual": multilingual,
            "model_specs": [{"model_format": "pytorch", "quantizations": ["none"], "model_uri": str(folder)}]}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaServer]:
    with media_server(tmp_path_factory.mktemp("xdask-audio-home")) as m:
        yield m


@pytest.fixture(scope="module")
def client(media: MediaServer) -> httpx.Client:
    return media.http


@pytest.fixture(scope="module")
def oai(media: MediaServer):
    return media.openai


def launch(client: httpx.Client, family: dict, **options) -> str:
    resp = client.post("/v1/model_registrations/audio", json={"model": json.dumps(family)})
    assert resp.status_code == 200, resp.text
    resp = client.post("/v1/models", json={"model_name": family["model_name"], "model_type": "audio", **options})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_engine"] == "transformers"
    return resp.json()["model_uid"]


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_media_models import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="module")
def whisper(client: httpx.Client, whisper_folder: Path) -> str:
    return launch(client, audio_family(ASR, whisper_folder, "audio2text"), num_beams=1)


@pytest.fixture(scope="module")
def vits(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    from support.tiny_media_models import build_tiny_vits

    return launch(client, audio_family(TTS, build_tiny_vits(tmp_path_factory.mktemp("tiny-vits")), "text2audio",
                                       multilingual=False))


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def float_wav(seconds: float = 1.0, rate: int = 48000) -> bytes:
    """A 32-bit float stereo WAV (format 3), which the stdlib ``wave`` module cannot read."""
    t = np.arange(int(seconds * rate)) / rate
    data = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 500 * t)], 1).astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 2, rate, rate * 8, 8, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


# -- transcriptions and translations ------------------------------------------------------


def test_the_running_models_describe_their_ops(client: httpx.Client, whisper: str, vits: str):
    asr = client.get(f"/v1/models/{whisper}").json()
    assert asr["model_type"] == "audio" and asr["multilingual"] is True
    assert asr["engine"]["ops"] == ["transcribe", "translate"] and asr["engine"]["sampling_rate"] == 16000
    assert client.get(f"/v1/models/{vits}").json()["engine"]["ops"] == ["speech"]


def test_json_transcription(oai, whisper: str):
    resp = oai.audio.transcriptions.create(file=("tone.wav", tone_wav(), "audio/wav"), model=whisper)
    assert isinstance(resp.text, str)


def test_text_transcription_is_plain_text(oai, client: httpx.Client, whisper: str):
    text = oai.audio.transcriptions.create(file=("tone.wav", tone_wav()), model=whisper, response_format="text")
    assert isinstance(text, str)
    raw = client.post("/v1/audio/transcriptions", data={"model": whisper, "response_format": "text"},
                      files=[("file", ("tone.wav", tone_wav()))])
    assert raw.headers["content-type"].startswith("text/plain") and raw.text.endswith("\n")


def test_srt_and_vtt_are_timed_cues(oai, whisper: str):
    srt = oai.audio.transcriptions.create(file=("t.wav", tone_wav(2.0)), model=whisper, response_format="srt")
    assert re.match(r"^1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n", srt), srt
    vtt = oai.audio.transcriptions.create(file=("t.wav", tone_wav(2.0)), model=whisper, response_format="vtt")
    assert re.match(r"^WEBVTT\n\n00:00:\d\d\.\d{3} --> 00:00:\d\d\.\d{3}\n", vtt), vtt


def test_verbose_json_has_segments_language_and_duration(oai, whisper: str):
    resp = oai.audio.transcriptions.create(file=("t.wav", tone_wav(2.0, rate=22050)), model=whisper,
                                           response_format="verbose_json", language="fr", temperature=0.2)
    assert resp.language == "french" and resp.duration == pytest.approx(2.0, abs=0.01)
    assert isinstance(resp.text, str) and resp.segments
    seg = resp.segments[0]
    assert seg.id == 0 and 0.0 <= seg.start <= seg.end <= resp.duration and isinstance(seg.text, str)
    assert seg.temperature == 0.2


def test_word_timestamps(oai, whisper: str):
    resp = oai.audio.transcriptions.create(file=("t.wav", tone_wav(1.0)), model=whisper,
                                           response_format="verbose_json", timestamp_granularities=["word"])
    assert isinstance(resp.words, list) and not resp.segments
    for word in resp.words:
        assert isinstance(word.word, str) and 0.0 <= word.start <= word.end <= resp.duration


def test_language_detection_names_a_language(oai, whisper: str):
    resp = oai.audio.transcriptions.create(file=("t.wav", tone_wav(1.0)), model=whisper,
                                           response_format="verbose_json")
    assert resp.language in {"english", "french", "german"}


def test_translation(oai, whisper: str):
    resp = oai.audio.translations.create(file=("t.wav", float_wav()), model=whisper, response_format="verbose_json")
    assert resp.language == "english" and isinstance(resp.text, str) and resp.duration == pytest.approx(1.0, abs=0.01)
    assert isinstance(oai.audio.translations.create(file=("t.wav", tone_wav()), model=whisper).text, str)


def test_prompt_and_xinference_form(client: httpx.Client, whisper: str):
    """Xinference's client: a file named ``file`` as octet-stream, extras in ``kwargs``, no granularities."""
    resp = client.post("/v1/audio/transcriptions",
                       data={"model": whisper, "language": "en", "prompt": "the tone", "response_format": "json",
                             "temperature": "0", "kwargs": json.dumps({})},
                       files=[("file", ("file", tone_wav(), "application/octet-stream"))])
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == {"text"}


# -- speech ----------------------------------------------------------------------------------


def read_wav(data: bytes) -> tuple[int, int, int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()


def test_speech_returns_a_wav(oai, vits: str):
    resp = oai.audio.speech.create(model=vits, input="hello world", voice="alloy", response_format="wav")
    assert resp.response.headers["content-type"] == "audio/wav"
    channels, width, rate, frames = read_wav(resp.content)
    assert (channels, width, rate) == (1, 2, 16000) and frames > 0


def test_speech_defaults_to_wav_and_speed_shortens_it(client: httpx.Client, vits: str):
    slow = client.post("/v1/audio/speech", json={"model": vits, "input": "a longer sentence to say", "speed": 0.5})
    fast = client.post("/v1/audio/speech", json={"model": vits, "input": "a longer sentence to say", "speed": 4.0})
    assert slow.status_code == fast.status_code == 200, slow.text
    assert read_wav(fast.content)[3] < read_wav(slow.content)[3]


def test_speech_as_pcm(client: httpx.Client, vits: str):
    resp = client.post("/v1/audio/speech", json={"model": vits, "input": "hello", "voice": "x",
                                                 "response_format": "pcm"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "audio/pcm"
    assert len(resp.content) % 2 == 0 and len(resp.content) > 0 and not resp.content.startswith(b"RIFF")


def test_speech_through_xinference_body(client: httpx.Client, vits: str):
    resp = client.post("/v1/audio/speech", json={"model": vits, "input": "hi", "voice": "", "response_format": "wav",
                                                 "speed": 1.0, "stream": False, "kwargs": json.dumps({})})
    assert resp.status_code == 200 and resp.content[:4] == b"RIFF"


def test_python_clients(media: MediaServer, whisper: str, vits: str):
    """``xdask.Client``'s handles, and Xinference's own client, with Xinference's method names."""
    from xinference_client import RESTfulClient

    from xdask.client import Client

    with Client(media.server.endpoint) as xd:
        asr = xd.get_model(whisper)
        assert set(asr.transcriptions(tone_wav(1.0))) == {"text"}
        assert isinstance(asr.transcriptions(tone_wav(1.0), response_format="text"), str)
        verbose = asr.transcriptions(tone_wav(1.0), language="de", response_format="verbose_json",
                                     timestamp_granularities=["word", "segment"])
        assert verbose["language"] == "german" and "words" in verbose and "segments" in verbose
        assert asr.translations(tone_wav(1.0), response_format="srt").startswith("1\n")
        wav = xd.get_model(vits).speech("hello there")
        assert read_wav(wav)[2] == 16000
    xinf = RESTfulClient(media.server.endpoint)
    assert set(xinf.get_model(whisper).transcriptions(tone_wav(1.0))) == {"text"}
    assert xinf.get_model(vits).speech("hello", response_format="wav")[:4] == b"RIFF"


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("upload", "code", "words"), [
    (b"hello, this is a text file\n", "invalid_audio", "not audio"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(64), "unsupported_audio_format", "only WAV is supported"),
    (b"fLaC" + bytes(64), "unsupported_audio_format", "flac"),
    (b"RIFF\x04\x00\x00\x00WAVE", "invalid_audio", "no format or data chunk"),
])
def test_non_wav_uploads_are_400s(oai, whisper: str, upload: bytes, code: str, words: str):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        oai.audio.transcriptions.create(file=("x.wav", upload), model=whisper)
    body = err.value.body
    assert body["code"] == code and words in body["message"] and body["param"] == "file"


def test_missing_file_and_bad_fields_are_400s(client: httpx.Client, whisper: str):
    missing = client.post("/v1/audio/transcriptions", data={"model": whisper},
                          files=[("audio", ("a.wav", tone_wav(0.2)))])
    assert missing.status_code == 400 and error_of(missing)["param"] == "file"
    as_text = client.post("/v1/audio/transcriptions", data={"model": whisper, "file": "not a file"},
                          files=[("other", ("a.wav", b"x"))])
    assert as_text.status_code == 400 and "uploaded file" in error_of(as_text)["message"]
    for fields, param in [({"response_format": "xml"}, "response_format"), ({"temperature": "3"}, "temperature"),
                          ({"language": "klingon"}, "language"), ({"stream": "true"}, "stream"), ({}, "model")]:
        data = {"model": whisper, **fields} if fields else {}
        resp = client.post("/v1/audio/transcriptions", data=data, files=[("file", ("a.wav", tone_wav(0.2)))])
        assert resp.status_code == 400 and error_of(resp)["param"] == param, (fields, resp.text)
    not_multipart = client.post("/v1/audio/transcriptions", json={"model": whisper})
    assert not_multipart.status_code == 400 and "multipart/form-data" in error_of(not_multipart)["message"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": "mp3"}, "response_format", "wav or pcm"),
    ({"input": ""}, "input", "must not be empty"),
    ({"input": "x" * 4097}, "input", "4096"),
    ({"speed": 5}, "speed", "less than or equal to 4"),
])
def test_bad_speech_requests_are_400s(client: httpx.Client, vits: str, body: dict, param: str, words: str):
    resp = client.post("/v1/audio/speech", json={"model": vits, "input": "hi", "voice": "a", **body})
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == param and words in error_of(resp)["message"]


def test_ops_the_model_does_not_serve_are_wrong_model_type(client: httpx.Client, whisper: str, vits: str):
    speech = client.post("/v1/audio/speech", json={"model": whisper, "input": "hi", "voice": "a"})
    assert speech.status_code == 400 and error_of(speech)["code"] == "wrong_model_type"
    heard = client.post("/v1/audio/transcriptions", data={"model": vits}, files=[("file", ("a.wav", tone_wav(0.2)))])
    assert heard.status_code == 400 and error_of(heard)["code"] == "wrong_model_type"
    image = client.post("/v1/images/generations", json={"model": whisper, "prompt": "a fox"})
    assert image.status_code == 400 and error_of(image)["code"] == "wrong_model_type"
    assert "audio model" in error_of(image)["message"]


def test_english_only_whisper_does_not_translate(client: httpx.Client, whisper_folder: Path):
    uid = launch(client, audio_family("tiny-whisper-en", whisper_folder, "audio2text", multilingual=False),
                 num_beams=1)
    try:
        assert client.get(f"/v1/models/{uid}").json()["engine"]["ops"] == ["transcribe"]
        resp = client.post("/v1/audio/translations", data={"model": uid}, files=[("file", ("a.wav", tone_wav(0.2)))])
        assert resp.status_code == 400 and error_of(resp)["code"] == "wrong_model_type"
    finally:
        client.delete(f"/v1/models/{uid}")


def test_unknown_launch_option_is_400(client: httpx.Client, whisper_folder: Path):
    resp = client.post("/v1/models", json={"model_name": ASR, "model_type": "audio", "model_uid": "bad-opts",
                                           "beam_width": 2})
    assert resp.status_code == 400 and "num_beams" in error_of(resp)["message"]


def test_terminate_frees_the_model(client: httpx.Client, vits: str):
    assert client.delete(f"/v1/models/{vits}").status_code == 200
    assert client.get(f"/v1/models/{vits}").status_code == 404
    workers = client.get("/v1/cluster/workers").json()["data"]
    assert all(vits not in json.dumps(w.get("models", [])) for w in workers)
    after = client.post("/v1/audio/speech", json={"model": vits, "input": "hi", "voice": "a"})
    assert after.status_code == 404
