"""xdask settings, kept in ``dask.config`` under the ``xdask`` key.

Why dask.config: the same settings then reach a script, the CLI, a worker
process and a notebook without a second configuration system. Environment
variables ``XDASK_*`` are read here (dask itself only reads ``DASK_*``):
``XDASK_HOME=/data/xd`` sets ``xdask.home``; a double underscore nests, so
``XDASK_LLAMA_CPP__N_PARALLEL=8`` sets ``xdask.llama-cpp.n-parallel``.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = pathlib.Path(__file__).with_name("xdask.yaml")

# Single-underscore names that are not nested keys but whole keys, so that the
# common variables read naturally (XDASK_LLAMA_CPP_BACKEND, not ..._CPP__BACKEND).
_FLAT_ALIASES: dict[str, str] = {
    "XDASK_HOME": "xdask.home",
    "XDASK_ENDPOINT": "xdask.endpoint",
    "XDASK_LLAMA_CPP_BACKEND": "xdask.llama-cpp.backend",
    "XDASK_LLAMA_CPP_N_PARALLEL": "xdask.llama-cpp.n-parallel",
    "XDASK_LLAMA_CPP_N_CTX_PER_SLOT": "xdask.llama-cpp.n-ctx-per-slot",
    "XDASK_LLAMA_CPP_N_THREADS": "xdask.llama-cpp.n-threads",
    "XDASK_MAX_BODY_SIZE": "xdask.server.max-body-size",
    "XDASK_REQUEST_TIMEOUT": "xdask.server.request-timeout",
    "XDASK_LAUNCH_TIMEOUT": "xdask.launch.timeout",
    # The seed's (Xinference's) names, each a whole key.
    "XDASK_HEALTH_CHECK_ATTEMPTS": "xdask.health-check.attempts",
    "XDASK_HEALTH_CHECK_INTERVAL": "xdask.health-check.interval",
    "XDASK_DISABLE_HEALTH_CHECK": "xdask.health-check.disable",
    "XDASK_DISABLE_METRICS": "xdask.metrics.disable",
    "XDASK_LOG_LEVEL": "xdask.logs.level",
    "XDASK_LOG_MAX_BYTES": "xdask.logs.max-bytes",
    "XDASK_LOG_BACKUP_COUNT": "xdask.logs.backup-count",
}


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Turn ``XDASK_*`` variables into a nested dict that dask.config can merge."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("XDASK_"):
            continue
        if name in _FLAT_ALIASES:
            path = _FLAT_ALIASES[name].split(".")
        else:
            parts = name[len("XDASK_") :].lower().split("__")
            path = ["xdask", *(p.replace("_", "-") for p in parts)]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw else raw
    return out


def load() -> None:
    """Merge xdask's defaults and ``XDASK_*`` variables into dask.config.

    Safe to call repeatedly: defaults never override what a user already set,
    and environment variables always win over both.
    """
    with _DEFAULTS_FILE.open() as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)
    overrides = _env_overrides(dict(os.environ))
    if overrides:
        dask.config.update(dask.config.config, overrides, priority="new")


def get(key: str, default: Any = None) -> Any:
    """Read ``xdask.<key>`` from dask.config."""
    return dask.config.get(f"xdask.{key}", default=default)


def home() -> pathlib.Path:
    """The xdask home folder (logs, cache, custom models), created on demand."""
    path = pathlib.Path(os.path.expanduser(str(get("home")))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_dir(role: str) -> pathlib.Path:
    """A fresh ``XDASK_HOME/logs/<role>_<ms>/`` folder for one process's log.

    Processes started in the same millisecond (three workers of one command)
    must not share a file: the next free millisecond is taken instead.
    """
    base = home() / "logs"
    base.mkdir(parents=True, exist_ok=True)
    stamp = int(time.time() * 1000)
    while True:
        path = base / f"{role}_{stamp}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            stamp += 1


load()
