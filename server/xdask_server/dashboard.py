"""HTTP binding of the live dashboard: its page, the data its sources poll for, and two redirects.

What the page shows and how its data is computed is ``dashboard_view``.
"""

from __future__ import annotations

from tornado import web

from xdask_server.base import BaseHandler
from xdask_server.dashboard_view import Dashboard


class _DashboardHandler(BaseHandler):
    """The app's ``Dashboard``."""

    @property
    def dashboard(self) -> Dashboard:
        return self.application.settings["dashboard"]


class DashboardRedirectHandler(BaseHandler):
    """``GET /dashboard`` → ``dashboard/``: the page lives under the slash so its relative URLs resolve.

    The Location is relative, so the same answer is right here and behind
    Jupyter's proxy (``/xdask/dashboard`` → ``/xdask/dashboard/``).
    """

    def get(self) -> None:
        query = f"?{self.request.query}" if self.request.query else ""
        self.redirect("dashboard/" + query)


class DashboardApiLinkHandler(BaseHandler):
    """``GET /dashboard/links/api`` → ``/v1/models``: the header's API link.

    A rooted Location, unlike the page's URLs: a proxy (Jupyter's maps ``/``
    to its API prefix) rewrites it, while no relative URL is right both here
    and behind the proxy, where the API is not a sibling of the dashboard.
    """

    def get(self) -> None:
        self.redirect("/v1/models")


class DashboardPageHandler(_DashboardHandler):
    """``GET /dashboard/``: the dashboard's HTML (built once, then cached)."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")

    async def get(self) -> None:
        page = await self.dashboard.page()
        self._etag = page.etag
        self.set_header("Cache-Control", "no-cache")  # revalidate: a new server version has a new page
        self.finish(page.html)

    def compute_etag(self) -> str | None:
        return getattr(self, "_etag", None)  # precomputed: hashing 2 MB per request is waste


class DashboardDataHandler(_DashboardHandler):
    """``GET /dashboard/data/<name>``: the columns one of the page's sources polls for."""

    async def get(self, name: str) -> None:
        data = await self.dashboard.data(name)
        self.set_header("Cache-Control", "no-store")
        self.write_json(data)


def routes() -> list[tuple[str, type[web.RequestHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [
        (r"/dashboard", DashboardRedirectHandler),
        (r"/dashboard/", DashboardPageHandler),
        (r"/dashboard/data/([a-z]+)", DashboardDataHandler),
        (r"/dashboard/links/api", DashboardApiLinkHandler),
    ]
