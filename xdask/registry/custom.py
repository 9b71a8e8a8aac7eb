"""Custom model families that users register, optionally persisted under ``XDASK_HOME``.

A persisted family is one JSON file,
``XDASK_HOME/registrations/<model_type>/<model_name>.json``, written
atomically (a temporary file in the same folder, then ``os.replace``), and
read back at every lookup: a server restarted on the same home (a new
process) sees it, and so does any other process on that home. A family
registered without ``persist`` lives in this process only.

Only the server process needs these: it resolves a launch and sends the
whole family and spec to the worker, so custom families work cluster-wide.

The accepted JSON is our schema (``xdask.registry.specs``) or Xinference's
custom-model shape, where each spec names its files with ``model_id`` and
``model_hub`` or with ``model_uri``, or with a ``model_src`` map of hubs.

Examples
--------
>>> from xdask.registry import custom
>>> fam = custom.register("LLM", {
...     "model_name": "my-qwen", "model_ability": ["chat"], "context_length": 4096,
...     "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 0.5,
...                      "quantizations": ["none"], "model_uri": "/models/qwen"}]})
>>> fam.is_builtin
False
>>> custom.unregister("LLM", "my-qwen")
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
import threading
from typing import Any

import pydantic

from xdask import config
from xdask.errors import ConflictError, InvalidRequestError, NotFoundError
from xdask.registry.builtins import builtin_families, builtin_type_of, normalize_model_type
from xdask.registry.specs import FAMILY_CLASSES, MODEL_NAME_RE, AnyFamily

logger = logging.getLogger(__name__)

#: Families registered without ``persist``: model type → name → family.
_EPHEMERAL: dict[str, dict[str, AnyFamily]] = {}
_LOCK = threading.Lock()


def registrations_dir(model_type: str) -> pathlib.Path:
    """``XDASK_HOME/registrations/<model_type>``."""
    return config.home() / "registrations" / model_type


def _validation_message(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _from_xinference(raw: dict[str, Any]) -> dict[str, Any]:
    """Map Xinference's per-spec ``model_id``/``model_hub``/``model_src`` onto ``sources``."""
    raw = dict(raw)
    specs = []
    for spec in raw.get("model_specs") or []:
        if not isinstance(spec, dict):
            specs.append(spec)
            continue
        spec = dict(spec)
        sources = list(spec.get("sources") or [])
        quantizations = spec.get("quantizations")
        if "model_id" in spec:
            source: dict[str, Any] = {"hub": spec.pop("model_hub", "huggingface"), "model_id": spec.pop("model_id")}
            if spec.get("model_revision"):
                source["revision"] = spec.pop("model_revision")
            spec.pop("model_revision", None)
            sources.append(source)
        for hub, src in (spec.pop("model_src", None) or {}).items():
            src = dict(src)
            quantizations = quantizations or src.get("quantizations")
            if src.get("model_file_name_template"):
                spec.setdefault("model_file_name_template", src.pop("model_file_name_template"))
            src.pop("model_file_name_template", None)
            sources.append({"hub": hub, **src})
        if sources:
            spec["sources"] = sources
        if quantizations is not None:
            spec["quantizations"] = quantizations
        specs.append(spec)
    if "model_specs" in raw:
        raw["model_specs"] = specs
    return raw


def parse_family(model_type: str, model: str | dict[str, Any]) -> AnyFamily:
    """Validate a custom family (JSON text or a dict); 400 with pydantic's message."""
    model_type = normalize_model_type(model_type)
    if isinstance(model, str):
        try:
            model = json.loads(model)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"The model spec is not valid JSON: {exc}", param="model") from exc
        except (RecursionError, ValueError) as exc:  # nested thousands deep, or a 5000-digit number
            raise InvalidRequestError(f"The model spec is not JSON xdask reads: {type(exc).__name__}",
                                      param="model") from None
    if not isinstance(model, dict):
        raise InvalidRequestError("The model spec must be a JSON object", param="model")
    declared = model.get("model_type")
    if declared is not None and str(declared).lower() != model_type.lower():
        raise InvalidRequestError(
            f"The spec says model_type {declared!r} but it is registered as {model_type!r}", param="model_type"
        )
    raw = {**_from_xinference(model), "model_type": model_type, "is_builtin": False}
    try:
        return FAMILY_CLASSES[model_type].model_validate(raw)
    except pydantic.ValidationError as exc:
        raise InvalidRequestError(
            f"Invalid {model_type} model spec: {_validation_message(exc)}", param="model"
        ) from exc


def _persisted(model_type: str) -> dict[str, AnyFamily]:
    folder = registrations_dir(model_type)
    out: dict[str, AnyFamily] = {}
    if not folder.is_dir():
        return out
    cls = FAMILY_CLASSES[model_type]
    for path in sorted(folder.glob("*.json")):
        try:
            fam = cls.model_validate_json(path.read_bytes())
        except (OSError, pydantic.ValidationError) as exc:  # one bad file must not hide the others
            logger.warning("Ignoring custom model file %s: %s", path, exc)
            continue
        out[fam.model_name] = fam
    return out


def custom_families(model_type: str) -> dict[str, AnyFamily]:
    """Custom families of a type: persisted ones (read now) and this process's."""
    model_type = normalize_model_type(model_type)
    with _LOCK:
        return {**_persisted(model_type), **_EPHEMERAL.get(model_type, {})}


def _write_atomically(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def register(model_type: str, model: str | dict[str, Any], persist: bool = False) -> AnyFamily:
    """Add a custom family; 409 if the name is taken by any built-in or custom family."""
    model_type = normalize_model_type(model_type)
    family = parse_family(model_type, model)
    name = family.model_name
    builtin = builtin_type_of(name)
    if builtin is not None:
        raise ConflictError(
            f"{name!r} is the name of a built-in {builtin} model; choose another model_name",
            param="model_name", code="model_name_taken",
        )
    with _LOCK:
        for other in FAMILY_CLASSES:
            if name in _EPHEMERAL.get(other, {}) or (registrations_dir(other) / f"{name}.json").exists():
                raise ConflictError(
                    f"A custom {other} model called {name!r} is already registered; unregister it first",
                    param="model_name", code="model_name_taken",
                )
        if persist:
            text = family.model_dump_json(indent=2, exclude_none=True)
            _write_atomically(registrations_dir(model_type) / f"{name}.json", text + "\n")
        else:
            _EPHEMERAL.setdefault(model_type, {})[name] = family
    logger.info("Registered custom %s model %s (persist=%s)", model_type, name, persist)
    return family


def unregister(model_type: str, model_name: str) -> None:
    """Remove a custom family (its file too); 404 if none, 400 for a built-in one."""
    model_type = normalize_model_type(model_type)
    if model_name in builtin_families(model_type):
        raise InvalidRequestError(f"{model_name!r} is a built-in model and cannot be unregistered",
                                  param="model_name")
    if not MODEL_NAME_RE.match(model_name) or len(model_name) > 100:  # never a path outside the folder (or too long)
        raise NotFoundError(f"No custom {model_type} model called {model_name!r} is registered",
                            param="model_name")
    path = registrations_dir(model_type) / f"{model_name}.json"
    with _LOCK:
        found = _EPHEMERAL.get(model_type, {}).pop(model_name, None) is not None
        if path.is_file():
            path.unlink()
            found = True
    if not found:
        raise NotFoundError(f"No custom {model_type} model called {model_name!r} is registered",
                            param="model_name")
    logger.info("Unregistered custom %s model %s", model_type, model_name)
