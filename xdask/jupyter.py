"""``import xdask.jupyter as xj`` / ``%load_ext xdask.jupyter``: widgets and magics in a notebook.

The code lives in the ``xdask_jupyter`` package (``extensions/``); this module
re-exports it under the name users expect.
"""

from __future__ import annotations

from xdask_jupyter import load_ipython_extension
from xdask_jupyter.connection import connect, current_client
from xdask_jupyter.widgets import ChatWidget, Launcher, ModelTable, dashboard

__all__ = ["ChatWidget", "Launcher", "ModelTable", "connect", "current_client", "dashboard",
           "load_ipython_extension"]
