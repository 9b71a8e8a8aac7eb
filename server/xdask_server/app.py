"""Build and run the Tornado application of the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
import logging

from tornado import httpserver, web

from xdask import config
from xdask.auth.authenticator import Authenticator
from xdask.auth.redact import install_log_redaction
from xdask.batch.api import BatchManager
from xdask.batch.store import BatchStore
from xdask.cluster.supervisor import Supervisor
from xdask_server import (
    audio,
    batches,
    chat,
    dashboard,
    images,
    models,
    monitoring,
    retrieval,
    route_scopes,
    tokens,
)
from xdask_server.audio_serving import AudioServing
from xdask_server.base import NotFoundHandler
from xdask_server.dashboard_view import Dashboard
from xdask_server.image_serving import ImageServing
from xdask_server.image_store import ImageStore
from xdask_server.metrics import Metrics, endpoint_labels
from xdask_server.serving import OpenAIServing
from xdask_server.stats import HttpStats, RequestStats, Sampler

#: The modules of the API families, each exporting ``routes()``.
FAMILIES = (chat, models, retrieval, images, audio, batches, monitoring, dashboard, tokens)

logger = logging.getLogger(__name__)


def make_app(supervisor: Supervisor, auth: Authenticator | None = None) -> web.Application:
    """The application: routes, and the supervisor the handlers use.

    ``auth`` guards every route (``xdask_server.route_scopes``); None: the auth config
    that ``xdask.auth-config`` (``XDASK_AUTH_CONFIG``) names, if any, else none.

    Called on the running loop (as the CLI does), it also starts sampling the
    request statistics for the dashboard and the batch manager (which resumes
    the batches a previous server left unfinished); otherwise call
    ``app.settings["sampler"].start()`` once the loop runs (the batch manager
    starts with its first request).
    """
    auth = auth if auth is not None else route_scopes.authenticator_from_config()
    install_log_redaction()  # credentials a client put in a URL never reach a log file
    stats = RequestStats()
    interval = float(config.get("dashboard.sample-interval"))
    sampler = Sampler(stats, interval, int(config.get("dashboard.history")), live=supervisor.known_models,
                      window=round(float(config.get("dashboard.summary-window")) / interval))
    batch_manager = BatchManager(supervisor, BatchStore(config.home() / "batches"))
    _start_on_running_loop(sampler)
    _start_on_running_loop(batch_manager)
    image_serving = ImageServing(supervisor, ImageStore.from_config(), stats)
    _start_on_running_loop(image_serving.store)  # deletes generated images past their retention
    routes = [route for family in FAMILIES for route in family.routes()]
    http_stats = HttpStats()
    return route_scopes.GuardedApplication(
        routes,
        auth=auth,
        supervisor=supervisor,
        stats=stats,
        serving=OpenAIServing(supervisor, stats),
        images=image_serving,
        audio=AudioServing(supervisor, stats),
        sampler=sampler,
        batches=batch_manager,
        dashboard=Dashboard(supervisor, stats, sampler),
        http_stats=http_stats,
        endpoint_labels={**endpoint_labels(routes), NotFoundHandler: "unmatched"},
        metrics=Metrics(supervisor, stats, http_stats, sampler),
        default_handler_class=NotFoundHandler,
        compress_response=False,
    )


def _start_on_running_loop(service: Sampler | BatchManager | ImageStore) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    service.start()


class _Server(httpserver.HTTPServer):
    """The HTTP server; stopping it also stops the app's running batches.

    Why here: every caller stops the server first and then terminates the
    models. Batches must stop before that, or their requests would fail
    against vanishing models and be written down as failed; stopped here,
    they keep their state and the next server resumes them.
    """

    def stop(self) -> None:
        super().stop()
        settings = getattr(self.request_callback, "settings", {})
        batches = settings.get("batches")
        if batches is not None:
            batches.stop()
        images = settings.get("images")
        if images is not None:
            images.store.stop()


def start_http_server(app: web.Application, host: str, port: int) -> httpserver.HTTPServer:
    """Listen on ``host:port``; bodies over the cap are refused by the handlers."""
    limit = int(config.get("server.max-body-size"))
    server = _Server(app, max_body_size=limit * 64, idle_connection_timeout=3600)
    server.listen(port, address=host)
    logger.info("xdask server listening on http://%s:%d", host, port)
    return server
