"""Logging: a rotating file per process role under ``XDASK_HOME/logs``."""

from __future__ import annotations

import logging
import logging.handlers
import pathlib

from xdask import config

_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(role: str, level: str | int = "INFO", console: bool = True) -> pathlib.Path:
    """Log ``xdask``, ``distributed`` and ``tornado`` to ``logs/<role>_<ms>/xdask.log``.

    Returns the log file's path, which the CLI prints.
    """
    path = config.log_dir(role) / "xdask.log"
    file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=50 * 2**20, backupCount=5)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.addHandler(file_handler)
    for name in ("xdask", "xdask_server"):
        logging.getLogger(name).setLevel(level)
    if console:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        stream.setLevel(logging.WARNING)
        logging.getLogger("xdask").addHandler(stream)
    return path
