"""xdask: serve open models on Dask, through an OpenAI-compatible API.

``xdask.Client`` talks to a running server; ``xdask-local`` starts one with
an embedded cluster. See README.md.

The names below are imported on first use, so that ``import
xdask.engines.transformers`` on a GPU box without httpx or dask installed
pulls in only what the engine needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "ModelHandle", "XdaskError", "__version__", "config"]

if TYPE_CHECKING:
    from xdask import config
    from xdask.client import Client, ModelHandle
    from xdask.errors import XdaskError

_LAZY = {
    "Client": "xdask.client",
    "ModelHandle": "xdask.client",
    "XdaskError": "xdask.errors",
    "config": "xdask.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xdask' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(module)
    return mod if name == "config" else getattr(mod, name)
