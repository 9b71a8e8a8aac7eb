"""The OpenAI Batch API's engine: a JSONL file in, chunk tasks on the cluster, output and error files out.

The HTTP handlers (``xdask_server.batches``) only bind routes to a
``BatchManager``; everything a batch does is here, with its files and state
on disk through ``store.BatchStore``.

A batch's life, as OpenAI's: ``validating`` (the input file is read and each
line checked, in a thread) → ``in_progress`` (its requests run as
``runner.run_chunk`` tasks, grouped by ``body.model``, a bounded number of
chunks at a time) → ``finalizing`` → ``completed``; or ``failed`` (the file as
a whole is unusable), or ``cancelling`` → ``cancelled``.

Choices, where OpenAI leaves room or xdask differs:

- A line that is not JSON, or lacks ``custom_id``/``method``/``url``/``body``,
  or names another endpoint, does not fail the batch (OpenAI would): it
  becomes a line of the error file (``response: null``, ``error: {code,
  message, line}``), counts as failed, and the rest run. A body the endpoint's
  schema refuses, or for a model that is not running, is a request-level
  error as OpenAI writes them: ``response.status_code`` 400/404 and the
  OpenAI error body.
- Duplicate ``custom_id``s fail the batch at validation (as OpenAI does),
  each reported in ``errors.data`` with its line: the custom_id is what
  matches outputs to inputs, and what a resumed batch skips by.
- Output lines are in completion order (a chunk's in input order), as
  OpenAI guarantees no order either: match them by ``custom_id``.
- ``output_file_id`` / ``error_file_id`` are set when the batch ends and
  only if the file has lines; a cancelled batch keeps what finished.
- A restarted server resumes every unfinished batch: the custom_ids already in
  its output and error files are skipped, so nothing is lost or repeated. A
  resumed batch waits (``batch-api.model-wait``) for its models, which are
  usually relaunched after the server; a new batch fails a request for a model
  that is not running at once.
- Batches do not expire: ``expires_at`` is reported, never enforced.
- One server runs the batches of one ``XDASK_HOME``.

Examples
--------
>>> manager = BatchManager(supervisor, BatchStore(config.home() / "batches"))   # doctest: +SKIP
>>> manager.start()
>>> upload = manager.store.new_upload(); upload.write(open("in.jsonl", "rb").read())
>>> f = await manager.add_file(upload, "in.jsonl", "batch")
>>> b = await manager.create(CreateBatchRequest(input_file_id=f["id"], endpoint="/v1/chat/completions",
...                                             completion_window="24h"))
>>> manager.get(b["id"])["status"]
'validating'
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import itertools
import json
import logging
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any

from xdask import config
from xdask.api.batch import CreateBatchRequest
from xdask.batch.runner import URLS, error_outcome, parse_item, run_chunk
from xdask.batch.store import BatchStore, Upload, line_key, new_id
from xdask.errors import ConflictError, InvalidRequestError, NotFoundError, XdaskError

logger = logging.getLogger(__name__)

#: The endpoints a batch may name, and the runner's kind for each.
ENDPOINTS: dict[str, str] = {url: kind for kind, url in URLS.items()}

#: Endpoints OpenAI batches that xdask does not run yet, and when they come (none now:
#: /v1/embeddings batches run since the embeddings API exists).
NOT_YET: dict[str, str] = {}

#: States a batch can leave; the others are final.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")

#: ``errors.data`` of a failed batch keeps at most this many entries.
_MAX_REPORTED = 100

#: Seconds between looks at a model that is not ready yet.
_MODEL_POLL = 1.0


# -- lines of the input, output and error files ----------------------------------


def output_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line of the output file: the request's 200 answer."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": new_id("req_"), "body": body}, "error": None}


def failed_request_line(custom_id: str, error: dict[str, Any]) -> dict[str, Any]:
    """A line of the error file for a request the API answered with an error (a runner outcome's ``error``)."""
    body = {"error": {"message": error["message"], "type": error["type"], "param": error["param"],
                      "code": error["code"]}}
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": int(error["status"]), "request_id": new_id("req_"), "body": body},
            "error": None}


def bad_line(custom_id: str | None, line: int, code: str, message: str) -> dict[str, Any]:
    """A line of the error file for an input line that is not a request at all (nothing was sent)."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line}}


@dataclass
class Item:
    """One input line after validation: a request to run, or its error line, already known."""

    line: int
    custom_id: str | None
    model: str | None = None
    body: dict[str, Any] | None = None
    error_line: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return line_key(self.custom_id, self.line)


def parse_line(n: int, raw: bytes, endpoint: str) -> Item:
    """Check one input line: a request, or the error line it becomes."""
    try:
        obj = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        return Item(n, None, error_line=bad_line(None, n, "invalid_json", f"Line {n} is not valid JSON: {exc}"))
    if not isinstance(obj, dict):
        return Item(n, None, error_line=bad_line(None, n, "invalid_request", f"Line {n} is not a JSON object"))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return Item(n, None, error_line=bad_line(None, n, "missing_required_parameter",
                                                 f"Line {n} has no custom_id (a non-empty string)"))
    problem: tuple[str, str] | None = None
    if obj.get("method") != "POST":
        problem = ("invalid_method", f"Line {n}: method must be \"POST\", not {obj.get('method')!r}")
    elif obj.get("url") != endpoint:
        problem = ("mismatched_url", f"Line {n}: url {obj.get('url')!r} is not the batch's endpoint {endpoint}")
    elif not isinstance(obj.get("body"), dict):
        problem = ("invalid_request", f"Line {n}: body must be a JSON object")
    if problem is not None:
        return Item(n, cid, error_line=bad_line(cid, n, *problem))
    body = obj["body"]
    model = body.get("model")
    try:
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("model is required: the uid of a running model", param="model")
        parse_item(ENDPOINTS[endpoint], model, body)
    except XdaskError as exc:
        return Item(n, cid, error_line=failed_request_line(cid, error_outcome(exc)["error"]))
    return Item(n, cid, model, body)


def read_input(path: pathlib.Path, endpoint: str, max_requests: int) -> tuple[list[Item], list[dict[str, Any]]]:
    """Every request line of a batch file, and the errors that fail the whole batch (blocking: run in a thread)."""
    items: list[Item] = []
    fatal: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            item = parse_line(n, raw, endpoint)
            if item.custom_id is not None:
                first = first_line.setdefault(item.custom_id, n)
                if first != n:
                    fatal.append({"code": "duplicate_custom_id", "line": n, "param": "custom_id",
                                  "message": f"custom_id {item.custom_id!r} of line {n} is already used by line "
                                             f"{first}: custom_ids must be unique within a batch"})
            items.append(item)
            if len(items) > max_requests:
                fatal.append({"code": "too_many_requests", "line": n, "param": None,
                              "message": f"A batch holds at most {max_requests} requests"})
                break
    if not items:
        fatal.append({"code": "empty_file", "line": None, "param": None, "message": "The input file has no requests"})
    return items, fatal[:_MAX_REPORTED]


# -- chunk tasks that a cancel can stop ------------------------------------------------

#: Stopped runs a worker remembers, so a chunk that starts after the stop does nothing.
_STOPPED_KEPT = 1000


def _worker_sets(worker: Any) -> tuple[dict[str, set[asyncio.Task[Any]]], dict[str, None]]:
    """This worker's running batch chunks by run, and the runs stopped (an ordered set)."""
    if not hasattr(worker, "_xdask_batch_chunks"):
        worker._xdask_batch_chunks = {}
        worker._xdask_stopped_runs = {}
    return worker._xdask_batch_chunks, worker._xdask_stopped_runs


async def run_batch_chunk(run_id: str, uid: str, kind: str, bodies: list[Any]) -> list[dict[str, Any]] | None:
    """A Dask task: ``runner.run_chunk``, which ``stop_batch_chunks`` can stop while it runs (then None).

    Why: Dask cancels a task only before it starts, and a running chunk would
    keep the model busy for a batch nobody wants any more. Cancelling the
    chunk cancels its requests' streams, which stops their generation.
    """
    from distributed import get_worker

    running, stopped = _worker_sets(get_worker())
    if run_id in stopped:
        return None
    inner = asyncio.ensure_future(run_chunk(uid, kind, bodies))
    mine = running.setdefault(run_id, set())
    mine.add(inner)
    try:
        return await inner
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if inner.cancelled() and (current is None or not current.cancelling()):
            return None  # stopped by its batch; the worker closing is another matter (Dask reschedules)
        raise
    finally:
        mine.discard(inner)
        if not mine:
            running.pop(run_id, None)


def stop_batch_chunks(run_id: str, dask_worker: Any = None) -> int:
    """Run on each worker (``Client.run``): stop one run's chunks; how many were running there."""
    running, stopped = _worker_sets(dask_worker)
    stopped[run_id] = None
    while len(stopped) > _STOPPED_KEPT:
        del stopped[next(iter(stopped))]
    tasks = running.pop(run_id, set())
    for task in tasks:
        task.cancel()
    return len(tasks)


# -- the manager ---------------------------------------------------------------------


@dataclass
class BatchJob:
    """One batch: its OpenAI object and what the manager keeps beside it."""

    batch: dict[str, Any]
    output_id: str  #: reserved ids of the output and error files, which grow while the batch runs
    error_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    writing: asyncio.Future[None] | None = None  #: the last append to the output files
    cancel_requested: bool = False

    @property
    def id(self) -> str:
        return self.batch["id"]

    def state(self) -> dict[str, Any]:
        return {"batch": copy.deepcopy(self.batch), "output_file": self.output_id, "error_file": self.error_id}


def _now() -> int:
    return int(time.time())


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _page(ids: list[str], objects: dict[str, dict[str, Any]], limit: int) -> dict[str, Any]:
    page = ids[:limit]
    return {"object": "list", "data": [copy.deepcopy(objects[i]) for i in page],
            "first_id": page[0] if page else None, "last_id": page[-1] if page else None,
            "has_more": len(ids) > limit}


class BatchManager:
    """Files and batches of one server; runs each batch as an asyncio task on the server's loop.

    Every file operation goes to a thread; a batch's requests go to the
    cluster as Dask tasks of ``run_chunk``, so the loop only moves chunks.
    """

    def __init__(self, supervisor: Any, store: BatchStore):
        self.supervisor = supervisor
        self.store = store
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, BatchJob] = {}
        self._load_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- life ----------------------------------------------------------------------

    def start(self) -> None:
        """Reload files and batches from disk and resume the unfinished batches (on the running loop)."""
        if self._load_task is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load(), name="xdask-batches-load")

    async def ready(self) -> None:
        """Wait until what is on disk is loaded (a request right after a restart must see its batch)."""
        self.start()
        assert self._load_task is not None
        await asyncio.shield(self._load_task)

    def stop(self) -> None:
        """Stop running batches without changing their state: the next server resumes them.

        Synchronous, so the server calls it as it stops listening, before the
        models are terminated: a request failing because its model went away
        at shutdown must not be written down as failed.
        """
        self._closing = True
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()

    async def _load(self) -> None:
        await asyncio.to_thread(self.store.ensure)
        for meta in await asyncio.to_thread(self.store.load_files):
            self.files[meta["id"]] = meta
        for state in await asyncio.to_thread(self.store.load_batches):
            job = BatchJob(state["batch"], state["output_file"], state["error_file"])
            self.jobs[job.id] = job
            if job.batch["status"] in ACTIVE:
                logger.info("Resuming batch %s (%s)", job.id, job.batch["status"])
                self._launch(job, resumed=True)

    def _launch(self, job: BatchJob, resumed: bool) -> None:
        if not self._closing:
            job.task = asyncio.get_running_loop().create_task(self._run(job, resumed), name=f"xdask-{job.id}")

    # -- files -----------------------------------------------------------------------

    async def add_file(self, upload: Upload, filename: str, purpose: str) -> dict[str, Any]:
        """Keep a finished upload as a file."""
        await self.ready()
        meta = await asyncio.to_thread(self.store.commit_upload, upload, filename, purpose)
        self.files[meta["id"]] = meta
        return copy.deepcopy(meta)

    def get_file(self, file_id: str, param: str | None = None) -> dict[str, Any]:
        meta = self.files.get(file_id)
        if meta is None:
            raise NotFoundError(f"No such File object: {file_id}", param=param, code="file_not_found")
        return copy.deepcopy(meta)

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 10_000,
                   order: str = "desc") -> dict[str, Any]:
        """A page of files, newest first by default (OpenAI's ``after``/``limit``/``order``/``purpose``)."""
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order must be 'asc' or 'desc'", param="order")
        if not 1 <= limit <= 10_000:
            raise InvalidRequestError("limit must be between 1 and 10000", param="limit")
        ids = sorted((i for i, m in self.files.items() if purpose is None or m["purpose"] == purpose),
                     reverse=order == "desc")
        if after:
            ids = [i for i in ids if (i < after if order == "desc" else i > after)]
        return _page(ids, self.files, limit)

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        """Delete a file; not the input of a batch that is still running (409), which would need it to resume."""
        self.get_file(file_id)
        users = [j.id for j in self.jobs.values()
                 if j.batch["input_file_id"] == file_id and j.batch["status"] in ACTIVE]
        if users:
            raise ConflictError(f"File {file_id} is the input of batch {users[0]}, which is still running",
                                code="file_in_use")
        self.files.pop(file_id, None)
        await asyncio.to_thread(self.store.delete_file, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ----------------------------------------------------------------------

    async def create(self, req: CreateBatchRequest) -> dict[str, Any]:
        """Accept a batch (``validating``) and start it."""
        await self.ready()
        if req.endpoint not in ENDPOINTS:
            why = NOT_YET.get(req.endpoint, f"{req.endpoint} is not an endpoint a batch can use")
            raise InvalidRequestError(f"Unsupported endpoint: {why}; supported: {', '.join(ENDPOINTS)}",
                                      param="endpoint")
        if req.completion_window != "24h":
            raise InvalidRequestError(f"completion_window must be '24h', not {req.completion_window!r}",
                                      param="completion_window")
        meta = self.get_file(req.input_file_id, param="input_file_id")
        if meta["purpose"] != "batch":
            raise InvalidRequestError(f"File {meta['id']} has purpose {meta['purpose']!r}: a batch's input file "
                                      "must be uploaded with purpose 'batch'", param="input_file_id")
        created = _now()
        batch = {
            "id": new_id("batch_"), "object": "batch", "endpoint": req.endpoint, "errors": None,
            "input_file_id": req.input_file_id, "completion_window": req.completion_window,
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": created,
            "in_progress_at": None, "expires_at": created + 24 * 3600, "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.metadata,
            "model": None, "usage": None,
        }
        job = BatchJob(batch, new_id("file-"), new_id("file-"))
        self.jobs[job.id] = job
        await self._save(job)
        logger.info("Batch %s created on %s (%s)", job.id, req.input_file_id, req.endpoint)
        self._launch(job, resumed=False)
        return copy.deepcopy(batch)

    def _job(self, batch_id: str) -> BatchJob:
        job = self.jobs.get(batch_id)
        if job is None:
            raise NotFoundError(f"No such Batch object: {batch_id}", code="batch_not_found")
        return job

    def get(self, batch_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._job(batch_id).batch)

    def list_batches(self, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """A page of batches, newest first."""
        if not 1 <= limit <= 100:
            raise InvalidRequestError("limit must be between 1 and 100", param="limit")
        ids = sorted(self.jobs, reverse=True)
        if after:
            ids = [i for i in ids if i < after]
        return _page(ids, {i: self.jobs[i].batch for i in ids[:limit]}, limit)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: nothing more is submitted, running chunks are cancelled, what finished is kept."""
        await self.ready()
        job = self._job(batch_id)
        status = job.batch["status"]
        if status == "cancelling":
            return self.get(batch_id)
        if status not in ("validating", "in_progress"):
            raise ConflictError(f"Batch {batch_id} is {status}: only a validating or in-progress batch can be "
                                "cancelled", code="batch_not_cancellable")
        # Flag and cancel before the first await, so the task cannot finish in between.
        job.cancel_requested = True
        job.batch.update(status="cancelling", cancelling_at=_now())
        if job.task is not None and not job.task.done():
            job.task.cancel()
        await self._save(job)
        logger.info("Batch %s cancelling", batch_id)
        return self.get(batch_id)

    # -- running ----------------------------------------------------------------------

    async def _run(self, job: BatchJob, resumed: bool) -> None:
        try:
            if job.batch["status"] == "cancelling":  # the server stopped while it was cancelling
                await self._finish(job, "cancelled")
            else:
                await self._execute(job, resumed)
        except asyncio.CancelledError:
            if self._closing or not job.cancel_requested or job.batch["status"] not in ACTIVE:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await self._finish(job, "cancelled")
        except Exception as exc:  # a bug or a lost cluster fails this batch, not the server
            logger.exception("Batch %s failed", job.id)
            job.batch["errors"] = {"object": "list", "data": [
                {"code": "internal_error", "line": None, "param": None, "message": f"{type(exc).__name__}: {exc}"}]}
            await self._finish(job, "failed")

    async def _execute(self, job: BatchJob, resumed: bool) -> None:
        b = job.batch
        path = self.store.data_path(b["input_file_id"])
        if not path.exists():
            raise NotFoundError(f"The input file {b['input_file_id']} is gone")
        limit = int(config.get("batch-api.max-requests"))
        items, fatal = await asyncio.to_thread(read_input, path, b["endpoint"], limit)
        if fatal:
            b["errors"] = {"object": "list", "data": fatal}
            b["request_counts"]["total"] = len(items)
            await self._finish(job, "failed")
            return
        models = sorted({i.model for i in items if i.model})
        b["model"] = models[0] if len(models) == 1 else None
        prog = await asyncio.to_thread(self.store.progress, job.output_id, job.error_id)
        if b["status"] == "validating":
            b.update(status="in_progress", in_progress_at=_now())
        b["request_counts"] = {"total": len(items), "completed": prog.completed, "failed": prog.failed}
        b["usage"] = _usage(prog.input_tokens, prog.output_tokens)
        await self._save(job)
        todo = [i for i in items if i.key not in prog.done]
        await self._record(job, [], [i.error_line for i in todo if i.error_line is not None])
        await self._run_requests(job, [i for i in todo if i.error_line is None], resumed)
        await self._finish(job, "completed")

    async def _run_requests(self, job: BatchJob, items: list[Item], resumed: bool) -> None:
        """Run the requests, grouped by model, chunks of each model taken in turn."""
        by_model: dict[str, list[Item]] = collections.defaultdict(list)
        for item in items:
            by_model[str(item.model)].append(item)
        records = await asyncio.gather(*(self._wait_for_model(uid, resumed) for uid in by_model))
        queues = []
        for (uid, group), record in zip(by_model.items(), records, strict=True):
            if record is None:
                err = error_outcome(NotFoundError(f"Model not found in the model list, uid: {uid}", param="model",
                                                  code="model_not_found"))["error"]
                await self._record(job, [], [failed_request_line(str(i.custom_id), err) for i in group])
                continue
            size = self._chunk_size(record)
            queues.append([(uid, group[k:k + size]) for k in range(0, len(group), size)])
        chunks = [c for c in itertools.chain.from_iterable(itertools.zip_longest(*queues)) if c is not None]
        await self._run_chunks(job, chunks)

    async def _wait_for_model(self, uid: str, resumed: bool) -> dict[str, Any] | None:
        """The model's record once a replica serves; None if there is no such model (a new batch asks once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(config.get("batch-api.model-wait"))
        while True:
            try:
                record = await self.supervisor.get_model(uid)
            except NotFoundError:
                record = None
            if record is not None and record.get("state") in ("ready", "degraded"):
                return record
            if (record is None and not resumed) or loop.time() >= deadline:
                return record  # a model still loading: its requests are tried (and retried) anyway
            await asyncio.sleep(_MODEL_POLL)

    @staticmethod
    def _chunk_size(record: dict[str, Any]) -> int:
        """``xdask.batch.chunk-size``, or the model's concurrency: all its ready replicas' slots."""
        fixed = int(config.get("batch.chunk-size") or 0)
        if fixed > 0:
            return fixed
        slots = sum(int((r.get("engine") or {}).get("max_concurrency") or 1)
                    for r in record.get("replicas", []) if r.get("state") == "ready")
        return max(1, slots)

    async def _run_chunks(self, job: BatchJob, chunks: list[tuple[str, list[Item]]]) -> None:
        client = self.supervisor.client
        kind = ENDPOINTS[job.batch["endpoint"]]
        limit = max(1, int(config.get("batch-api.max-chunks-in-flight")))
        pending = collections.deque(chunks)
        running: dict[asyncio.Future[list[dict[str, Any]]], tuple[Any, list[Item]]] = {}
        run_id = new_id(f"{job.id}-")  # this server's run of the batch: what a stop names on the workers
        try:
            while pending or running:
                while pending and len(running) < limit:
                    uid, group = pending.popleft()
                    fut = client.submit(run_batch_chunk, run_id, uid, kind, [i.body for i in group], pure=False,
                                        key=f"run_chunk-{run_id}-{len(pending)}")
                    running[asyncio.ensure_future(self._chunk_outcomes(fut, len(group)))] = (fut, group)
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    _, group = running.pop(task)
                    outputs, errors = [], []
                    for item, outcome in zip(group, task.result(), strict=True):
                        if outcome.get("response") is not None:
                            outputs.append(output_line(str(item.custom_id), outcome["response"]))
                        else:
                            errors.append(failed_request_line(str(item.custom_id), outcome["error"]))
                    await self._record(job, outputs, errors)
        finally:
            if running:  # cancelled (by the user or a server stop): the cluster stops the chunks too
                for task in running:
                    task.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.cancel([fut for fut, _ in running.values()]), 10)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.run(stop_batch_chunks, run_id), 10)

    @staticmethod
    async def _chunk_outcomes(fut: Any, n: int) -> list[dict[str, Any]]:
        """A chunk task's outcomes; a task that failed as a whole (its worker died too often) fails its items."""
        try:
            outcomes = await fut
        except Exception as exc:  # noqa: BLE001
            logger.warning("A batch chunk failed: %s", exc)
            return [error_outcome(exc)] * n
        if not isinstance(outcomes, list) or len(outcomes) != n:
            return [error_outcome(XdaskError("The chunk task returned no outcome per request"))] * n
        return outcomes

    async def _record(self, job: BatchJob, outputs: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        """Append finished requests to the batch's files, then its counts and state.

        Shielded: a cancel arriving mid-write must not leave lines on disk
        that the counts do not know of.
        """
        if outputs or errors:
            job.writing = asyncio.ensure_future(self._append(job, outputs, errors))
            await asyncio.shield(job.writing)

    async def _append(self, job: BatchJob, outputs: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        await asyncio.to_thread(self.store.append, job.output_id, outputs)
        await asyncio.to_thread(self.store.append, job.error_id, errors)
        counts = job.batch["request_counts"]
        counts["completed"] += len(outputs)
        counts["failed"] += len(errors)
        usage = job.batch["usage"] or _usage(0, 0)
        for line in outputs:
            u = line["response"]["body"].get("usage") or {}
            usage["input_tokens"] += int(u.get("prompt_tokens") or 0)
            usage["output_tokens"] += int(u.get("completion_tokens") or 0)
        job.batch["usage"] = _usage(usage["input_tokens"], usage["output_tokens"])
        await self._save(job)

    async def _finish(self, job: BatchJob, status: str) -> None:
        """End a batch: its counts from the files themselves, the files published, the final state saved."""
        if job.writing is not None:
            with contextlib.suppress(Exception):
                await job.writing
        b = job.batch
        if status == "completed":
            b.update(status="finalizing", finalizing_at=_now())
            await self._save(job)
        prog = await asyncio.to_thread(self.store.progress, job.output_id, job.error_id)
        b["request_counts"].update(completed=prog.completed, failed=prog.failed)
        if prog.completed or prog.failed:
            b["usage"] = _usage(prog.input_tokens, prog.output_tokens)
        for count, file_id, key, suffix in ((prog.completed, job.output_id, "output_file_id", "output"),
                                            (prog.failed, job.error_id, "error_file_id", "error")):
            if count:
                meta = await asyncio.to_thread(self.store.publish, file_id, f"{b['id']}_{suffix}.jsonl",
                                               "batch_output")
                self.files[file_id] = meta
                b[key] = file_id
        b["status"] = status
        b[f"{status}_at"] = _now()
        await self._save(job)
        logger.info("Batch %s %s: %s", job.id, status, b["request_counts"])

    async def _save(self, job: BatchJob) -> None:
        """Write the batch's state; shielded and in order, so the file on disk is never older than a later save."""
        await asyncio.shield(self._write_state(job))

    async def _write_state(self, job: BatchJob) -> None:
        async with job.lock:
            state = job.state()  # taken under the lock: saves land in the order of their snapshots
            await asyncio.to_thread(self.store.save_batch, state)
