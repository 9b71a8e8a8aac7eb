"""HTTP binding of what watches the server and the cluster: probes, metrics, health and workers.

* ``GET /healthz``: liveness. 200 whenever this process's event loop answers;
  it asks nothing of the cluster, so a slow scheduler never gets the server
  restarted.
* ``GET /readyz``: readiness. 200 when the scheduler answers within
  ``xdask.health-check.timeout`` seconds and, with
  ``xdask.health-check.require-model``, at least one model is ready
  (``ready`` or ``degraded``); 503 otherwise, with the reason.
* ``GET /metrics``: Prometheus text (``xdask_server.metrics``); 404 when
  ``XDASK_DISABLE_METRICS=1``.

* ``GET /v1/cluster/health``: the detailed view, every problem, for people and
  ``xdask health`` (200 when all is well, 503 otherwise);
  ``GET /v1/cluster/workers``: each worker's resources, GPUs, models and memory;
  ``GET /status``: the server and its scheduler answer.

Examples
--------
.. code-block:: yaml

    # Kubernetes
    livenessProbe: {httpGet: {path: /healthz, port: 9997}}
    readinessProbe: {httpGet: {path: /readyz, port: 9997}}
"""

from __future__ import annotations

from xdask import config
from xdask.errors import NotFoundError
from xdask_server import metrics
from xdask_server.base import BaseHandler
from xdask_server.route_scopes import caller_may


class LivenessHandler(BaseHandler):
    """``GET /healthz``: the process is up."""

    def get(self) -> None:
        self.write_json({"status": "alive"})


class ReadinessHandler(BaseHandler):
    """``GET /readyz``: the scheduler answers (and, if required, a model is ready)."""

    async def get(self) -> None:
        health = await self.supervisor.health()
        need_model = bool(config.get("health-check.require-model"))
        reasons = []
        if health["status"] == "down":
            reasons.extend(health["problems"])
        if need_model and not health.get("ready_models"):
            reasons.append("no model is ready (xdask.health-check.require-model)")
        body = {"status": "not_ready" if reasons else "ready", "scheduler": health["status"] != "down",
                "ready_models": health.get("ready_models", 0), "reasons": reasons}
        self.write_json(body, status=503 if reasons else 200)


class MetricsHandler(BaseHandler):
    """``GET /metrics``: the Prometheus text page."""

    async def get(self) -> None:
        if not metrics.enabled():
            raise NotFoundError("Metrics are disabled (XDASK_DISABLE_METRICS)", code="metrics_disabled")
        page: metrics.Metrics = self.application.settings["metrics"]
        body = await page.render()
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


class ClusterWorkersHandler(BaseHandler):
    """``GET /v1/cluster/workers``: address, resources, used/free GPUs, models and memory of each worker."""

    async def get(self) -> None:
        self.write_json({"object": "list", "data": await self.supervisor.workers()})


class ClusterHealthHandler(BaseHandler):
    """``GET /v1/cluster/health``: 200 when all is well, 503 with the problems otherwise."""

    async def get(self) -> None:
        health = await self.supervisor.health()
        self.write_json(health, status=200 if health["status"] == "ok" else 503)


class HealthHandler(BaseHandler):
    """``GET /status``: the server and its scheduler answer."""

    async def get(self) -> None:
        info = await self.supervisor.scheduler.identity()
        answer = {"status": "ok", "scheduler": info.get("address"), "workers": len(info.get("workers", {}))}
        if not caller_may(self, "models:list"):
            del answer["scheduler"]  # open to probes; where the cluster is, only to callers who may list models
        self.write_json(answer)


def routes() -> list[tuple[str, type[BaseHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [
        (r"/healthz", LivenessHandler), (r"/readyz", ReadinessHandler), (r"/metrics", MetricsHandler),
        (r"/v1/cluster/workers", ClusterWorkersHandler), (r"/v1/cluster/health", ClusterHealthHandler),
        (r"/status", HealthHandler),
    ]
