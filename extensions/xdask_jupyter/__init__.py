"""xdask in Jupyter: the server extension, ipywidgets and IPython magics.

Import name ``xdask_jupyter`` (installed from ``extensions/``); users reach
the widgets and magics as ``xdask.jupyter``.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Jupyter Server finds the extension app here (enabled by the installed config file)."""
    from xdask_jupyter.extension import XdaskExtension

    return [{"module": "xdask_jupyter.extension", "app": XdaskExtension}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext xdask.jupyter`` (or ``xdask_jupyter``): registers ``%xdask`` and ``%%chat``."""
    from xdask_jupyter.magics import XdaskMagics

    ipython.register_magics(XdaskMagics)
