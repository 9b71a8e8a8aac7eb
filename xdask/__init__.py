"""xdask: serve open models on Dask, through an OpenAI-compatible API.

``xdask.Client`` talks to a running server; ``xdask-local`` starts one with
an embedded cluster. See README.md.
"""

from xdask import config as config
from xdask.client import Client, ModelHandle
from xdask.errors import XdaskError

__version__ = "0.1.0"

__all__ = ["Client", "ModelHandle", "XdaskError", "__version__"]
