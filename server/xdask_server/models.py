"""HTTP binding of model management: launch, list, describe, terminate, launch progress and cancel,
registrations, engines, the model cache and memory estimates (Xinference's routes and shapes).

The logic is the ``Supervisor``'s (``xdask.cluster.supervisor``), the catalog's
(``xdask.registry``) and the memory estimator's (``xdask.cluster.memory``);
the answers' shapes are ``xdask.api.models``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado import web

from xdask.api.models import LaunchModelRequest, RegisterModelRequest, describe_model
from xdask.errors import InvalidRequestError, MethodNotAllowedError, NotFoundError
from xdask.registry import custom as custom_models
from xdask.registry import list_families
from xdask_server.base import BaseHandler

_UID = r"([^/]+)"


def registrations(model_type: str, detailed: bool) -> list[dict[str, Any]]:
    """``GET /v1/model_registrations/{type}`` in Xinference's shape."""
    out = []
    for fam in list_families(model_type):
        item: dict[str, Any] = {"model_name": fam.model_name, "is_builtin": fam.is_builtin}
        if detailed:
            item.update(fam.model_dump(mode="json", exclude={"chat_template"}))
        out.append(item)
    return out


class ModelsHandler(BaseHandler):
    """``GET /v1/models`` lists running models; ``POST`` launches one."""

    async def get(self) -> None:
        records = await self.supervisor.list_models()
        self.write_json({"object": "list", "data": [describe_model(r) for r in records]})

    async def post(self) -> None:
        req = self.parse(LaunchModelRequest)
        uid = await self.supervisor.launch(req)
        record = await self.supervisor.get_model(uid)
        self.write_json({"model_uid": uid, "model_engine": record["spec"]["model_engine"]})


class CacheModelsHandler(BaseHandler):
    """``GET /v1/cache/models[?model_name=]`` lists every worker's cache; ``DELETE ?model_version=`` removes one.

    The answers keep Xinference's shape (``{"list": [...]}``, ``{"result": true}``)
    and add where each entry is (``address``, ``worker_ip``) and what was removed.
    """

    async def get(self) -> None:
        model_name = self.get_query_argument("model_name", None) or None
        self.write_json({"list": await self.supervisor.cached_models(model_name)})

    async def delete(self) -> None:
        version = self.get_query_argument("model_version", None)
        raw = self.body()
        if version is None and raw:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
                raise InvalidRequestError("Request body is not valid JSON") from None
            version = body.get("model_version") if isinstance(body, dict) else None
        if not version:
            raise InvalidRequestError("model_version is required", param="model_version")
        removed = await self.supervisor.remove_cached(version)
        self.write_json({"result": True, "model_version": version, "removed": removed})


class MemoryEstimateHandler(BaseHandler):
    """``GET /v1/cal_model_mem?model_name=&size_in_billions=&model_format=&quantization=&context_length=``.

    ``xdask cal-model-mem`` over HTTP, computed on the server (which may fetch
    the model's config.json, a few KB, from Hugging Face).
    """

    async def get(self) -> None:
        from xdask.cluster.memory import estimate_catalog_model

        def arg(name: str) -> str | None:
            return self.get_query_argument(name, None) or None

        model_name = arg("model_name")
        if not model_name:
            raise InvalidRequestError("model_name is required", param="model_name")
        try:
            context_arg = arg("context_length")
            context = int(context_arg) if context_arg else None
            batch = int(arg("batch") or 1)
        except ValueError:
            raise InvalidRequestError("context_length and batch must be integers") from None
        if (context is not None and context < 1) or batch < 1:
            raise InvalidRequestError("context_length and batch must be positive", param="context_length"
                                      if context is not None and context < 1 else "batch")
        est = await asyncio.to_thread(
            estimate_catalog_model, model_name, arg("size_in_billions"), arg("model_format"), arg("quantization"),
            context, batch=batch, kv_cache_dtype=arg("kv_cache_dtype"),
        )
        self.write_json({"model_name": model_name, **est.to_dict()})


class LaunchProgressHandler(BaseHandler):
    """``GET /v1/models/{uid}/progress``: a launch's state and download progress (also once ready; 404 if unknown)."""

    async def get(self, uid: str) -> None:
        self.write_json(await self.supervisor.launch_progress(uid))


class LaunchCancelHandler(BaseHandler):
    """``POST /v1/models/{uid}/cancel``: stop a launch; its launch request answers 400 ``launch_cancelled``."""

    async def post(self, uid: str) -> None:
        self.write_json(await self.supervisor.cancel_launch(uid))


class EnginesHandler(BaseHandler):
    """``GET /v1/engines/{model_name}``: engine -> specs it can run on this cluster (or why not)."""

    async def get(self, model_name: str) -> None:
        self.write_json(await self.supervisor.engine_matrix(model_name))


class ModelHandler(BaseHandler):
    """``GET``/``DELETE /v1/models/{uid}``."""

    async def get(self, uid: str) -> None:
        self.write_json(describe_model(await self.supervisor.describe_model(uid)))

    async def delete(self, uid: str) -> None:
        await self.supervisor.terminate(uid)
        self.write_json({"id": uid, "object": "model", "deleted": True})


class RegistrationsHandler(BaseHandler):
    """``GET``/``POST /v1/model_registrations/{model_type}``, ``GET``/``DELETE .../{model_name}``.

    POST registers a custom family (``{"model": "<json>", "persist": bool}``),
    DELETE unregisters one; the logic is in ``xdask.registry.custom``.
    """

    async def get(self, model_type: str, model_name: str | None = None) -> None:
        detailed = self.get_query_argument("detailed", "false").lower() == "true"
        items = registrations(model_type, detailed or model_name is not None)
        if model_name is None:
            self.write_json(items)
            return
        for item in items:
            if item["model_name"] == model_name:
                self.write_json(item)
                return
        raise NotFoundError(f"Model family {model_name!r} is not registered", param="model_name")

    async def post(self, model_type: str, model_name: str | None = None) -> None:
        if model_name is not None:
            raise MethodNotAllowedError(f"POST a registration to /v1/model_registrations/{model_type}")
        req = self.parse(RegisterModelRequest)
        family = custom_models.register(model_type, req.model, persist=req.persist)
        self.write_json({"model_name": family.model_name, "model_type": family.model_type,
                         "persist": req.persist, "is_builtin": False})

    async def delete(self, model_type: str, model_name: str | None = None) -> None:
        if model_name is None:
            raise MethodNotAllowedError(f"DELETE /v1/model_registrations/{model_type}/<model_name>")
        custom_models.unregister(model_type, model_name)
        self.write_json({"model_name": model_name, "model_type": model_type, "deleted": True})


def routes() -> list[tuple[str, type[web.RequestHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [
        (r"/v1/models", ModelsHandler),
        (rf"/v1/models/{_UID}", ModelHandler),
        (rf"/v1/models/{_UID}/progress", LaunchProgressHandler),
        (rf"/v1/models/{_UID}/cancel", LaunchCancelHandler),
        (r"/v1/engines/([^/]+)", EnginesHandler),
        (r"/v1/cache/models", CacheModelsHandler),
        (r"/v1/cal_model_mem", MemoryEstimateHandler),
        (r"/v1/model_registrations/([^/]+)", RegistrationsHandler),
        (r"/v1/model_registrations/([^/]+)/([^/]+)", RegistrationsHandler),
    ]
