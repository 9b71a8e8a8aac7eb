"""Model sources and the local cache under ``XDASK_HOME/cache``."""

from xdask.hub.locate import locate_model

__all__ = ["locate_model"]
