"""Keep credentials out of logs and error messages.

Tornado's access log writes each request's method, URI and client address
(never headers), and error messages may quote what a client sent; a key
pasted into a URL or a request body could land in a log file from there.
:func:`redact` replaces anything shaped like an API key (``sk-...``), a JWT
or a bearer credential with a marker, and :class:`RedactingFilter` applies
it to every record (message and traceback) a log handler writes.

Examples
--------
>>> redact("GET /v1/models?api_key=sk-72tkvudyGLPMi (127.0.0.1)")
'GET /v1/models?api_key=sk-*** (127.0.0.1)'
>>> redact("Authorization: Bearer abc.def.ghi.jkl.mno")
'Authorization: Bearer ***'
"""

from __future__ import annotations

import logging
import re

#: API keys (Xinference's sk- + 13, and longer OpenAI-style ones), JWTs, and whatever follows "Bearer".
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-***"),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"), "<token>"),
    # Credential-shaped (12+ token68 characters), so that prose such as "Bearer <API key>" stays readable.
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{12,}"), r"\1 ***"),
)


def redact(text: str) -> str:
    """``text`` with API keys, tokens and bearer credentials masked."""
    if "sk-" not in text and "eyJ" not in text and "earer" not in text:  # the common case, kept cheap
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in a record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the logging module's to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


#: Loggers whose handlers get the filter besides the root's: Dask gives these handlers of their own.
_LOGGERS = ("", "tornado", "tornado.access", "tornado.application", "tornado.general", "distributed", "xdask",
            "xdask_server")


def install_log_redaction() -> int:
    """Add a :class:`RedactingFilter` to every handler of the process's loggers (once each).

    Called when a server starts, after its logging is set up; returns how
    many handlers got the filter.
    """
    added = 0
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
                added += 1
    return added
