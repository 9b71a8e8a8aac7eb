"""Logging: a rotating file per process role under ``XDASK_HOME/logs``.

Every xdask process logs to ``XDASK_HOME/logs/<role>_<ms>/xdask.log``, with
``role`` one of ``local`` (``xdask-local``), ``server`` (``xdask-server``),
``scheduler`` (``dask scheduler --preload xdask.cluster.scheduler_preload``)
and ``worker`` (the preload that ``xdask-worker`` adds). The file rolls over
at ``xdask.logs.max-bytes`` (100 MB) and keeps ``xdask.logs.backup-count`` (30)
older files; the level is ``xdask.logs.level`` unless the caller (a command's
``--log-level``) gives one.

Examples
--------
>>> from xdask.logs import setup_logging                         # doctest: +SKIP
>>> setup_logging("server")
PosixPath('/root/.xdask/logs/server_1764172800000/xdask.log')
>>> setup_logging("server")          # a second call keeps the first file
PosixPath('/root/.xdask/logs/server_1764172800000/xdask.log')
"""

from __future__ import annotations

import logging
import logging.handlers
import pathlib

from xdask import config

_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

#: Loggers that get the file handler besides the root logger: Dask's logging
#: setup gives ``distributed`` (and ``tornado``) their own stderr handler and
#: turns propagation off, so records would never reach a root handler.
_NON_PROPAGATING = ("distributed", "tornado")


class _XdaskFileHandler(logging.handlers.RotatingFileHandler):
    """The one file handler xdask installs per process (its type marks it).

    Its level is fixed (everything the loggers pass): ``LocalCluster``'s
    ``silence_logs`` sets every ``StreamHandler`` of the ``distributed`` logger
    to WARNING, which would otherwise empty ``xdask-local``'s log file.
    """

    def setLevel(self, level: int | str) -> None:
        """Ignore level changes from other libraries; the loggers' levels filter."""


class _XdaskConsoleHandler(logging.StreamHandler):
    """xdask's warnings on stderr (its type marks it)."""


def _installed() -> _XdaskFileHandler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _XdaskFileHandler):
            return handler
    return None


def log_level(level: str | int | None = None) -> str | int:
    """``level``, else ``xdask.logs.level``, as the ``logging`` module takes it (names upper-cased).

    Raises ``ValueError`` for a name ``logging`` does not know.
    """
    value = config.get("logs.level", "INFO") if level is None else level
    if isinstance(value, int):
        return value
    name = str(value).strip().upper()
    if name.isdigit():
        return int(name)
    if name not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {value!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return name


def setup_logging(role: str, level: str | int | None = None, console: bool = True) -> pathlib.Path:
    """Log ``xdask``, ``distributed`` and ``tornado`` to ``logs/<role>_<ms>/xdask.log``.

    Returns the log file's path, which the CLI prints.

    Safe to call more than once in a process: a process has one log, so a later
    call (a worker preload running inside ``xdask-local``'s process, a second
    server in a test) only applies ``level`` (and ``console``) and returns the
    file the first call opened, instead of adding handlers that would write
    every record twice.
    """
    level = log_level(level)
    xdask_loggers = [logging.getLogger(name) for name in ("xdask", "xdask_server")]
    for logger in xdask_loggers:
        logger.setLevel(level)
    if console and not any(isinstance(h, _XdaskConsoleHandler) for h in xdask_loggers[0].handlers):
        stream = _XdaskConsoleHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        stream.setLevel(logging.WARNING)
        xdask_loggers[0].addHandler(stream)
    existing = _installed()
    if existing is not None:
        return pathlib.Path(existing.baseFilename)
    # Dask configures its loggers when distributed is first imported; do it now
    # so that the propagation check below sees the final state.
    import distributed.config  # noqa: F401

    path = config.log_dir(role) / "xdask.log"
    file_handler = _XdaskFileHandler(path, maxBytes=int(config.get("logs.max-bytes")),
                                     backupCount=int(config.get("logs.backup-count")))
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(file_handler)
    for name in _NON_PROPAGATING:
        logger = logging.getLogger(name)
        if not logger.propagate:
            logger.addHandler(file_handler)
    return path
