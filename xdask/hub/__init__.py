"""Model sources and the local cache under ``XDASK_HOME/cache``."""

from xdask.hub.download import cache_folder, download_model
from xdask.hub.locate import locate_model
from xdask.hub.progress import LaunchProgress

__all__ = ["LaunchProgress", "cache_folder", "download_model", "locate_model"]
