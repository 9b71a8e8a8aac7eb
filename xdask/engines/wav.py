"""WAV in and out with the standard library and numpy: no ffmpeg, no audio packages.

Why: speech models take float samples at their own rate (16 kHz for Whisper)
and TTS models give float samples; WAV is the one container that needs no
codec, so the audio engine reads and writes it here. Other containers (MP3,
FLAC, Ogg, M4A, WebM) are recognised by their first bytes only, so that a
request with one gets a 400 that says what to send instead.

Reading parses the RIFF chunks itself instead of using ``wave``: ``wave``
refuses 32/64-bit float WAVs (format 3), which numpy and many recorders
write. Writing uses ``wave`` (16-bit PCM, the most widely played format).

Examples
--------
>>> import numpy as np
>>> tone = np.sin(np.linspace(0, 200 * np.pi, 8000)).astype(np.float32)
>>> data = encode_wav(tone, 8000)
>>> sniff(data)
'wav'
>>> samples, rate = decode_wav(data)
>>> rate, samples.shape, samples.dtype.name
(8000, (8000,), 'float32')
>>> resample(samples, 8000, 16000).shape
(16000,)
"""

from __future__ import annotations

import io
import struct
import wave

import numpy as np

from xdask.errors import InvalidRequestError

#: WAVE format tags: integer PCM, IEEE float, and the extensible header that names one of them.
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE

#: Containers recognised by their first bytes, so the 400 can name them.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"fLaC", "flac"),
    (0, b"OggS", "ogg"),
    (0, b"ID3", "mp3"),
    (4, b"ftyp", "mp4/m4a"),
    (0, b"\x1a\x45\xdf\xa3", "webm/mkv"),
    (0, b"FORM", "aiff"),
    (0, b"#!AMR", "amr"),
)


def sniff(data: bytes) -> str | None:
    """The audio container ``data`` starts like (``"wav"``, ``"mp3"``, ``"flac"``, ...), or None.

    Examples
    --------
    >>> sniff(b"RIFF\\x00\\x00\\x00\\x00WAVEfmt "), sniff(b"ID3\\x04..."), sniff(b"hello")
    ('wav', 'mp3', None)
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    for offset, magic, name in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return name
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # an MPEG audio frame without ID3 tags
        return "mp3"
    return None


def check_wav(data: bytes, param: str = "file") -> None:
    """400 unless ``data`` looks like a WAV file; the message says what was sent and what to send.

    Cheap (the first bytes only): the server calls it before a request goes
    to a model; ``decode_wav`` on the worker finds any damage further in.
    """
    kind = sniff(data)
    if kind == "wav":
        return
    if not data:
        raise InvalidRequestError("The audio file is empty", param=param)
    if kind is None:
        raise InvalidRequestError(
            "The uploaded file is not audio xdask can read: send a WAV file (PCM 8/16/24/32-bit or float)",
            param=param, code="invalid_audio",
        )
    raise InvalidRequestError(
        f"The uploaded file is {kind} audio; only WAV is supported (xdask decodes audio without ffmpeg). "
        "Convert it first, e.g. `ffmpeg -i in.mp3 -ar 16000 -ac 1 out.wav`",
        param=param, code="unsupported_audio_format",
    )


def _chunks(data: bytes) -> dict[bytes, bytes]:
    """The RIFF chunks of a WAVE file by id (the first of each); ``data`` may run to the end of the file."""
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(data):
        ident, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        start = pos + 8
        end = start + size
        if ident == b"data" and (size == 0xFFFFFFFF or end > len(data)):
            end = len(data)  # a streamed or truncated file: take what is there
        chunks.setdefault(ident, data[start:end])
        pos = end + (size & 1)
    return chunks


def decode_wav(data: bytes, param: str = "file") -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sampling rate of a WAV file; 400 when it is not one.

    Channels are averaged. Supported: integer PCM of 8, 16, 24 or 32 bits and
    IEEE float of 32 or 64 bits, plain or in an extensible header.
    """
    check_wav(data, param)
    chunks = _chunks(data)
    fmt, raw = chunks.get(b"fmt "), chunks.get(b"data")
    if fmt is None or len(fmt) < 16 or raw is None:
        raise InvalidRequestError("The WAV file has no format or data chunk", param=param, code="invalid_audio")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the first two bytes of the sub-format GUID
    if channels < 1 or rate < 1:
        raise InvalidRequestError("The WAV file has no channels or no sampling rate", param=param,
                                  code="invalid_audio")
    width = bits // 8
    usable = len(raw) - len(raw) % (width * channels) if width else 0
    if tag == _PCM and bits in (8, 16, 24, 32):
        if bits == 8:
            samples = (np.frombuffer(raw, np.uint8, usable).astype(np.float32) - 128.0) / 128.0
        elif bits == 24:
            triples = np.frombuffer(raw, np.uint8, usable).reshape(-1, 3).astype(np.int32)
            ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
            ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
            samples = ints.astype(np.float32) / float(1 << 23)
        else:
            dtype = np.dtype(f"<i{width}")
            samples = np.frombuffer(raw, dtype, usable // width).astype(np.float32) / float(1 << (bits - 1))
    elif tag == _FLOAT and bits in (32, 64):
        samples = np.frombuffer(raw, np.dtype(f"<f{width}"), usable // width).astype(np.float32)
    else:
        raise InvalidRequestError(
            f"WAV format {tag} with {bits}-bit samples is not supported: send integer PCM (8/16/24/32-bit) or float",
            param=param, code="unsupported_audio_format",
        )
    if not samples.size:
        raise InvalidRequestError("The WAV file holds no samples", param=param, code="invalid_audio")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return np.nan_to_num(samples, copy=False), int(rate)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``samples`` at ``target`` Hz by linear interpolation (float32).

    Linear interpolation has no anti-aliasing filter: content above the new
    Nyquist frequency folds back. Speech recognisers at 16 kHz barely notice,
    and it keeps numpy the only dependency.
    """
    if rate == target or not samples.size:
        return samples.astype(np.float32, copy=False)
    count = max(1, round(samples.size * target / rate))
    positions = np.arange(count, dtype=np.float64) * (rate / target)
    return np.interp(positions, np.arange(samples.size), samples).astype(np.float32)


def _pcm16(samples: np.ndarray) -> bytes:
    clipped = np.clip(np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1)), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    """A mono 16-bit PCM WAV file of float ``samples`` (clipped to [-1, 1])."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(_pcm16(samples))
    return out.getvalue()


def encode_pcm(samples: np.ndarray, rate: int, target: int = 24000) -> bytes:
    """Raw 16-bit little-endian mono samples at ``target`` Hz: OpenAI's ``pcm`` speech format (24 kHz)."""
    return _pcm16(resample(np.asarray(samples, dtype=np.float32).reshape(-1), rate, target))
