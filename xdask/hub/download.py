"""Fetch one model spec's files from Hugging Face or ModelScope into its cache folder.

Only the files the spec needs are fetched: the one GGUF file of the chosen
quantization, or a model folder's config, tokenizer and generation files
with its ``*.safetensors`` weights (``*.bin`` only in a repo that has no
safetensors). Files arrive in ``<folder>/.staging`` and move into the folder
when all are there; the folder's manifest is written last
(``xdask.hub.cache.mark_complete``), so a failed, cancelled or killed
download leaves nothing that a later launch takes as a model.

Resume: within one attempt huggingface_hub retries a dropped connection with
an HTTP ``Range`` request; across attempts (a cancel, an error, a killed
worker) the partial file ``.staging/<file>.<etag>.part`` stays and the next
attempt asks for the rest. ModelScope's client resumes from its own
``.incomplete`` files, which live in the same staging folder.

Every hub call goes through the hub's own client library: ``HfApi`` and
``huggingface_hub``'s ``http_get`` (its retries, auth headers and errors), and
``modelscope``'s ``snapshot_download``.

Examples
--------
>>> from xdask.registry import resolve                          # doctest: +SKIP
>>> from xdask.registry.specs import ModelSource
>>> resolved = resolve("qwen2.5-instruct", "ggufv2", "0_5", "Q4_K_M")
>>> path = download_model(resolved, resolved.spec.sources[0], cache_folder(resolved), LaunchProgress())
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import inspect
import logging
import os
import pathlib
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, cast

from xdask import config
from xdask.errors import (
    DownloadCancelledError,
    HubAccessError,
    HubNotFoundError,
    HubUnreachableError,
    InvalidRequestError,
    ModelDownloadError,
    XdaskError,
)
from xdask.hub.cache import cache_root, is_complete, mark_complete
from xdask.hub.progress import LaunchProgress
from xdask.registry.specs import ModelSource, ResolvedModel

logger = logging.getLogger(__name__)

STAGING = ".staging"
_LOCK_FILE = ".xdask-lock"

#: Files of a model folder besides its weights: config, tokenizer, generation config, chat template, remote code.
SIDE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja"]
#: Weights preferred, and the legacy ones taken only when a repo has no safetensors.
WEIGHT_PATTERNS = ["*.safetensors"]
LEGACY_WEIGHT_PATTERNS = ["pytorch_model*.bin", "model*.bin"]
_LEGACY_INDEX = "pytorch_model.bin.index.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cache_folder(resolved: ResolvedModel) -> pathlib.Path:
    """``XDASK_HOME/cache/<name>-<format>-<size>b-<quant>``: one folder per spec."""
    spec = resolved.spec
    return cache_root() / (
        f"{resolved.family.model_name}-{spec.model_format}-{spec.model_size_in_billions}b-{resolved.quantization}"
    )


def needed_files(repo_files: list[str], single_file: str | None, repo: str = "the repo") -> list[str]:
    """The files of ``repo_files`` a launch needs.

    ``single_file`` (a GGUF spec's file name) must be in the repo and is all
    that is fetched. Otherwise top-level config/tokenizer files and the
    safetensors weights (or, failing those, ``*.bin`` weights): never
    ``onnx/``, ``original/``, GGUF or ``*.pt`` files a folder model does not read.
    """
    if single_file:
        if single_file not in repo_files:
            ggufs = sorted(f for f in repo_files if f.endswith(".gguf"))
            listing = f"; it has: {', '.join(ggufs[:12])}" if ggufs else ""
            raise HubNotFoundError(f"{repo} has no file {single_file}{listing}", param="quantization",
                                   code="hub_not_found")
        return [single_file]
    top = [f for f in repo_files if "/" not in f]
    def match(name: str, patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    weights = [f for f in top if match(f, WEIGHT_PATTERNS)]
    legacy = not weights
    if legacy:
        weights = [f for f in top if match(f, LEGACY_WEIGHT_PATTERNS)]
    if not weights:
        raise HubNotFoundError(f"{repo} has no *.safetensors or *.bin weights at its top level",
                               code="hub_not_found")
    sides = [f for f in top if match(f, SIDE_PATTERNS) and (legacy or f != _LEGACY_INDEX)]
    return sorted(set(sides) | set(weights))


def preferred_hub(download_hub: str | None = None) -> str:
    """The hub to fetch from: the launch's ``download_hub``, else ``xdask.model-src`` (``XDASK_MODEL_SRC``)."""
    hub = (download_hub or config.get("model-src") or "huggingface").strip().lower()
    if hub not in ("huggingface", "modelscope"):
        raise InvalidRequestError(f"Unknown model hub {hub!r}: use huggingface or modelscope", param="download_hub")
    return hub


def download_model(resolved: ResolvedModel, source: ModelSource, folder: pathlib.Path,
                   progress: LaunchProgress | None = None) -> pathlib.Path:
    """Fetch ``source``'s files for ``resolved`` into ``folder``; the model's path (GGUF file or folder).

    Holds a file lock on ``folder`` so two workers of one machine do not
    fetch the same model at once (the second finds it complete). Raises an
    ``XdaskError`` that says what to do: ``HubAccessError``,
    ``HubNotFoundError``, ``HubUnreachableError``, ``DownloadCancelledError``
    or ``ModelDownloadError``.
    """
    progress = progress or LaunchProgress()
    single = resolved.spec.file_name(resolved.quantization)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder, progress):
        if is_complete(folder):
            return folder / single if single else folder
        progress.set_phase("downloading", source.hub, source.model_id)
        fetch = _fetch_huggingface if source.hub == "huggingface" else _fetch_modelscope
        revision, files = fetch(source, single, folder / STAGING, progress)
        for name in files:  # every file is in staging now: move them in, then the manifest
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder / STAGING / name, target)
        shutil.rmtree(folder / STAGING, ignore_errors=True)
        spec = resolved.spec
        mark_complete(folder, {
            "model_name": resolved.family.model_name, "model_format": spec.model_format,
            "model_size_in_billions": spec.model_size_in_billions, "quantization": resolved.quantization,
            "hub": source.hub, "model_id": source.model_id, "revision": revision, "files": files,
        })
    logger.info("Fetched %d file(s) of %s from %s:%s", len(files), resolved.family.model_name, source.hub,
                source.model_id)
    return folder / single if single else folder


@contextlib.contextmanager
def _folder_lock(folder: pathlib.Path, progress: LaunchProgress) -> Iterator[None]:
    """An exclusive ``flock`` on the folder's lock file; waiting for it can be cancelled."""
    try:
        import fcntl
    except ImportError:  # Windows: one worker per machine is the documented layout there
        yield
        return
    with open(folder / _LOCK_FILE, "a+b") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                progress.set_phase("waiting")  # another process fetches this model
                progress.check_cancelled()
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# -- Hugging Face ---------------------------------------------------------------------


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    # Read at call time: huggingface_hub reads HF_ENDPOINT only when first imported.
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hf_token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def _fetch_huggingface(source: ModelSource, single: str | None, staging: pathlib.Path,
                       progress: LaunchProgress) -> tuple[str, list[str]]:
    """Fetch into ``staging``; returns the commit sha and the files fetched."""
    try:
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    except ImportError as exc:
        raise ModelDownloadError("huggingface_hub is not installed: pip install 'xdask[hub]'") from exc
    from huggingface_hub import constants

    constants.DOWNLOAD_CHUNK_SIZE = int(config.get("hub.download-chunk-size"))
    endpoint, token = _hf_endpoint(), _hf_token()
    repo = source.model_id
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=source.revision)
        names = [s.rfilename for s in info.siblings or []]
        files = needed_files(names, single, f"Hugging Face repo {repo}")
        metas = {f: get_hf_file_metadata(hf_hub_url(repo, f, revision=info.sha, endpoint=endpoint), token=token)
                 for f in files}
        progress.start_files({f: m.size or 0 for f, m in metas.items()})
        headers = _hf_headers(token)
        for name, meta in metas.items():
            progress.check_cancelled()
            _hf_fetch_file(meta.location, staging, name, meta.size, meta.etag, headers, progress)
    except XdaskError:
        raise
    except Exception as exc:
        raise hf_error(exc, repo, endpoint, token is not None) from exc
    return str(info.sha), files


def _hf_headers(token: str | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token)


class _Quiet:
    """Keeps huggingface_hub's own progress bar off the worker's console (ours is ``LaunchProgress``)."""

    @staticmethod
    def tqdm_class() -> Any:
        from huggingface_hub.utils import tqdm

        class QuietTqdm(tqdm):
            def __init__(self, *args: Any, **kwargs: Any):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        return QuietTqdm


class _Sink:
    """The file ``http_get`` writes to: counts bytes, hashes them, and stops at a cancel."""

    def __init__(self, raw: Any, name: str, progress: LaunchProgress, digest: Any):
        self._raw = raw
        self._name = name
        self._progress = progress
        self._digest = digest

    def write(self, chunk: bytes) -> int:
        self._progress.check_cancelled()
        n = self._raw.write(chunk)
        if self._digest is not None:
            self._digest.update(chunk)
        self._progress.advance(self._name, len(chunk))
        return n

    def truncate(self, size: int | None = None) -> int:
        # The server ignored our Range and sends the whole file again: start the count and hash over.
        out = self._raw.truncate(size)
        self._raw.flush()
        kept = os.fstat(self._raw.fileno()).st_size
        if self._digest is not None:
            self._digest = _hash_prefix(pathlib.Path(self._raw.name), kept)
        self._progress.set_done(self._name, kept)
        return out

    def hexdigest(self) -> str | None:
        return None if self._digest is None else self._digest.hexdigest()

    def __getattr__(self, attr: str) -> Any:  # seek, tell, flush, ...
        return getattr(self._raw, attr)


def _hash_prefix(path: pathlib.Path, size: int) -> Any:
    digest = hashlib.sha256()
    if size <= 0:
        return digest
    with path.open("rb") as fh:
        left = size
        while left > 0 and (block := fh.read(min(left, 8 << 20))):
            digest.update(block)
            left -= len(block)
    return digest


def _hf_fetch_file(url: str, staging: pathlib.Path, name: str, size: int | None, etag: str | None,
                   headers: dict[str, str], progress: LaunchProgress) -> None:
    """Fetch one file to ``staging/name``, resuming ``staging/name.<etag>.part`` if an attempt left one."""
    from huggingface_hub.file_download import http_get

    final = staging / name
    if final.is_file() and (size is None or final.stat().st_size == size):
        progress.set_done(name, final.stat().st_size)
        return
    tag = hashlib.sha256((etag or url).encode()).hexdigest()[:12]
    part = staging / f"{name}.{tag}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    for stale in part.parent.glob(f"{glob_escape(pathlib.Path(name).name)}.*.part"):
        if stale != part:  # a partial file of an older revision of this file
            stale.unlink(missing_ok=True)
    resume = part.stat().st_size if part.exists() else 0
    if size is not None and resume > size:
        part.unlink()
        resume = 0
    if resume:
        logger.info("Resuming %s at byte %d of %s", name, resume, size)
    progress.set_done(name, resume)
    sha = (etag or "").strip('"').lower()
    digest = _hash_prefix(part, resume) if _SHA256.match(sha) else None  # LFS files: the ETag is their SHA-256
    kwargs: dict[str, Any] = {}
    if "tqdm_class" in inspect.signature(http_get).parameters:
        kwargs["tqdm_class"] = _Quiet.tqdm_class()
    with part.open("ab") as raw:
        sink = _Sink(raw, name, progress, digest)
        if size is None or resume < size:
            # _Sink has the file methods http_get uses (write), not the whole BinaryIO interface.
            http_get(url, cast(BinaryIO, sink), resume_size=resume, headers=headers, expected_size=size,
                     displayed_filename=name, **kwargs)
    got = sink.hexdigest()
    if got is not None and got != sha:
        part.unlink(missing_ok=True)
        raise ModelDownloadError(f"{name} arrived corrupted (SHA-256 {got[:12]}…, expected {sha[:12]}…); "
                                 "launch again to fetch it anew")
    os.replace(part, final)


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def hf_error(exc: BaseException, repo: str, endpoint: str, has_token: bool) -> XdaskError:
    """Turn a huggingface_hub or network error into an ``XdaskError`` that says what to do."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.GatedRepoError):
        return HubAccessError(
            f"The Hugging Face repo {repo} is gated: accept its license on huggingface.co and set HF_TOKEN "
            "(or run `hf auth login` on the workers), or use XDASK_MODEL_SRC=modelscope",
            code="gated_repo")
    if isinstance(exc, hf.HfHubHTTPError) and status == 401 and has_token and not isinstance(
            exc, hf.RepositoryNotFoundError):
        return HubAccessError(
            f"HF_TOKEN was rejected by {endpoint} (401): set a valid token (huggingface.co/settings/tokens) "
            "or unset HF_TOKEN for public models",
            code="hub_token_rejected")
    if isinstance(exc, hf.RepositoryNotFoundError):
        private = "" if has_token else " If it is private, set HF_TOKEN."
        return HubNotFoundError(
            f"The Hugging Face repo {repo} was not found at {endpoint}.{private} See which specs this model has "
            "with `xdask engine -n NAME`, or launch with model_path=<a local copy>",
            code="hub_not_found")
    if isinstance(exc, hf.RevisionNotFoundError):
        return HubNotFoundError(f"The Hugging Face repo {repo} has no revision named in the model spec",
                                code="hub_not_found")
    if isinstance(exc, hf.EntryNotFoundError) and not isinstance(exc, hf.LocalEntryNotFoundError):
        return HubNotFoundError(
            f"A file of the Hugging Face repo {repo} is missing: {_first_line(exc)}. See which specs this "
            "model has with `xdask engine -n NAME`, or launch with model_path=<a local copy>",
            code="hub_not_found")
    if isinstance(exc, hf.HfHubHTTPError) and status in (401, 403):
        return HubAccessError(f"{endpoint} refused access to {repo} ({status}): set HF_TOKEN to a token "
                              "that may read it, or use XDASK_MODEL_SRC=modelscope", code="gated_repo")
    if isinstance(exc, hf.HfHubHTTPError) and status is not None:
        return ModelDownloadError(f"Hugging Face answered {status} for {repo}: {_first_line(exc)}")
    if _is_network_error(exc):
        return HubUnreachableError(
            f"Cannot reach {endpoint} to fetch {repo} ({type(exc).__name__}: {_first_line(exc)}); "
            "set HF_ENDPOINT (a mirror) or XDASK_MODEL_SRC=modelscope, or launch with model_path",
            code="hub_unreachable")
    return ModelDownloadError(f"Download of {repo} from {endpoint} failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS, timeouts, dropped connections: from any HTTP library the hubs use."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        if isinstance(exc, (ConnectionError, TimeoutError)) or names & {
            "TransportError", "ConnectError", "TimeoutException", "RemoteProtocolError", "NetworkError",
            "ConnectionError", "Timeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
        }:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


# -- ModelScope --------------------------------------------------------------------------


class _MsCancelled(BaseException):
    """Raised inside ModelScope's download loop to stop it: a BaseException, because it retries Exceptions."""


def _ms_endpoint() -> str | None:
    return os.environ.get("MODELSCOPE_ENDPOINT") or None


def _fetch_modelscope(source: ModelSource, single: str | None, staging: pathlib.Path,
                      progress: LaunchProgress) -> tuple[str, list[str]]:
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.callback import ProgressCallback
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:
        raise ModelDownloadError("modelscope is not installed: pip install 'xdask[hub]'") from exc
    endpoint = _ms_endpoint()
    token = os.environ.get("MODELSCOPE_API_TOKEN") or None
    repo = source.model_id
    revision = source.revision or "master"

    class Report(ProgressCallback):
        def __init__(self, filename: str, file_size: int):
            super().__init__(filename, file_size)
            progress.set_done(filename, 0)

        def update(self, size: int) -> None:
            if progress.cancelled:
                raise _MsCancelled()
            progress.advance(self.filename, size)

    try:
        listing = HubApi(endpoint=endpoint, token=token).get_model_files(repo, revision=revision, recursive=True)
        sizes = {str(f["Path"]): int(f.get("Size") or 0) for f in listing}
        files = needed_files(list(sizes), single, f"ModelScope repo {repo}")
        progress.start_files({f: sizes[f] for f in files})
        staging.mkdir(parents=True, exist_ok=True)
        snapshot_download(repo, revision=revision, local_dir=str(staging), allow_patterns=files, max_workers=1,
                          progress_callbacks=[Report], token=token, endpoint=endpoint)
    except _MsCancelled:
        raise DownloadCancelledError(f"The launch of {progress.uid or repo} was cancelled") from None
    except XdaskError:
        raise
    except Exception as exc:
        cause = _ms_cause(exc)
        if isinstance(cause, _MsCancelled) or progress.cancelled:
            raise DownloadCancelledError(f"The launch of {progress.uid or repo} was cancelled") from None
        raise ms_error(cause, repo, endpoint) from exc
    missing = [f for f in files if not (staging / f).is_file()]
    if missing:
        raise ModelDownloadError(f"ModelScope delivered no {', '.join(missing)} of {repo}")
    for f in files:
        progress.set_done(f, (staging / f).stat().st_size)
    return revision, files


def _ms_cause(exc: BaseException) -> BaseException:
    """The first per-file failure of ModelScope's aggregated ``FileDownloadError``, else ``exc``."""
    failed = getattr(exc, "failed_files", None)
    if isinstance(failed, dict) and failed:
        return next(iter(failed.values()))
    return exc


def ms_error(exc: BaseException, repo: str, endpoint: str | None) -> XdaskError:
    """Turn a ModelScope error into an ``XdaskError`` that says what to do."""
    where = endpoint or "modelscope.cn"
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"AuthenticationError", "PermissionDeniedError"}:
        return HubAccessError(
            f"ModelScope refused access to {repo}: accept its license on modelscope.cn and set "
            "MODELSCOPE_API_TOKEN, or use XDASK_MODEL_SRC=huggingface", code="gated_repo")
    if "NotExistError" in names:
        return HubNotFoundError(
            f"The ModelScope repo {repo} (or a file of it) was not found at {where}. See which specs this model "
            "has with `xdask engine -n NAME`, or launch with model_path=<a local copy>", code="hub_not_found")
    if _is_network_error(exc):
        return HubUnreachableError(
            f"Cannot reach {where} to fetch {repo} ({type(exc).__name__}); set MODELSCOPE_ENDPOINT or "
            "XDASK_MODEL_SRC=huggingface, or launch with model_path", code="hub_unreachable")
    return ModelDownloadError(f"Download of {repo} from ModelScope failed: {type(exc).__name__}: {_first_line(exc)}")
