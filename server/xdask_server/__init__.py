"""xdask's Tornado server: the OpenAI-compatible and management HTTP API."""

from xdask_server.app import make_app, start_http_server

__all__ = ["make_app", "start_http_server"]
