"""The OpenAI Batch API (``/v1/files``, ``/v1/batches``) end to end, through the official ``openai`` client.

The fast tests check the parts that need no server (the streaming multipart
reader, line validation, the resume point on disk); the slow ones run real
batches on the default model, cancel one, feed bad input, and restart a
server in the middle of a batch.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support.servers import DEFAULT_LAUNCH, LocalServer, wait_until

from xdask.batch.api import read_input
from xdask.batch.store import BatchStore
from xdask_server.batches import MultipartReader

FINAL = ("completed", "failed", "cancelled", "expired")

CHAT_QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish.",
    "Name a fruit that is yellow.", "What animal says moo?", "What is the opposite of hot?",
    "Name a planet.",
]


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def chat_line(custom_id: str, content: str, model: str = "gemma", max_tokens: int = 12) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0}}


def upload(client: openai.OpenAI, data: bytes, name: str = "requests.jsonl") -> str:
    return client.files.create(file=(name, data), purpose="batch").id


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.2)


def read_file(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


# -- fast: no server ---------------------------------------------------------------


def test_multipart_reader_gives_the_same_file_however_the_body_is_split():
    content = b'{"a": 1}\r\n--not-the-boundary\r\n' + bytes(range(256)) * 40 + b"\r\n--bound"
    req = httpx.Request("POST", "http://x/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", content, "application/jsonl")})
    body = req.read()
    boundary = req.headers["content-type"].split("boundary=")[1].encode()
    for size in (1, 2, 3, 7, 64, 1000, len(body)):
        reader = MultipartReader(boundary)
        got = b"".join(b"".join(reader.feed(body[i:i + size])) for i in range(0, len(body), size))
        assert got == content, size
        assert reader.fields == {"purpose": "batch"} and reader.filename == "in.jsonl" and reader.done


def test_multipart_reader_refuses_a_huge_field():
    reader = MultipartReader(b"b", max_field=10)
    with pytest.raises(Exception, match="too long"):
        reader.feed(b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + b"x" * 100)


def test_lines_are_checked_one_by_one_and_duplicates_fail_the_batch(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([
        chat_line("a", "hi"),
        b"{not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
        {**chat_line("c", "hi"), "url": "/v1/completions"},
        {**chat_line("d", "hi"), "body": {"model": "gemma", "messages": "hi"}},
        b"",
        chat_line("e", "hi", model=""),
    ]))
    items, fatal = read_input(path, "/v1/chat/completions", 100)
    assert fatal == []
    assert [i.line for i in items] == [1, 2, 3, 4, 5, 7]
    assert items[0].error_line is None and items[0].model == "gemma"
    assert items[1].error_line["error"]["code"] == "invalid_json" and items[1].custom_id is None
    assert items[2].error_line["error"] == {"code": "missing_required_parameter", "line": 3,
                                            "message": "Line 3 has no custom_id (a non-empty string)"}
    assert items[3].error_line["error"]["code"] == "mismatched_url" and items[3].custom_id == "c"
    for item in items[4], items[5]:  # a bad body is a request-level 400, as the API would answer it
        assert item.error_line["error"] is None and item.error_line["response"]["status_code"] == 400
        assert item.error_line["response"]["body"]["error"]["type"] == "invalid_request_error"

    path.write_bytes(jsonl([chat_line("a", "x"), chat_line("b", "y"), chat_line("a", "z")]))
    _, fatal = read_input(path, "/v1/chat/completions", 100)
    assert [(e["code"], e["line"]) for e in fatal] == [("duplicate_custom_id", 3)]
    path.write_bytes(b"\n\n")
    assert read_input(path, "/v1/chat/completions", 100)[1][0]["code"] == "empty_file"


def test_the_resume_point_is_read_back_and_a_torn_line_cut_off(tmp_path):
    store = BatchStore(tmp_path)
    store.ensure()
    ok = {"id": "r1", "custom_id": "a", "error": None,
          "response": {"status_code": 200, "body": {"usage": {"prompt_tokens": 5, "completion_tokens": 3}}}}
    store.append("file-out", [ok])
    store.append("file-err", [{"id": "r2", "custom_id": None, "response": None,
                               "error": {"code": "invalid_json", "message": "m", "line": 4}}])
    with store.data_path("file-out").open("ab") as f:
        f.write(b'{"id": "r3", "custom_id": "b", "resp')  # a crash mid-append
    prog = store.progress("file-out", "file-err")
    assert prog.done == {"a", "line:4"} and (prog.completed, prog.failed) == (1, 1)
    assert (prog.input_tokens, prog.output_tokens) == (5, 3)
    assert store.data_path("file-out").read_bytes().endswith(b"}\n")


# -- slow: a real server and model --------------------------------------------------


@pytest.mark.slow
def test_chat_batch_answers_every_line(oai, default_model):
    lines = [chat_line(f"chat-{i}", CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]) for i in range(40)]
    file_id = upload(oai, jsonl(lines))
    f = oai.files.retrieve(file_id)
    assert (f.object, f.purpose, f.status, f.filename) == ("file", "batch", "processed", "requests.jsonl")
    assert f.bytes == len(jsonl(lines))
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"job": "chat"})
    assert batch.status == "validating" and batch.metadata == {"job": "chat"}
    assert batch.id in [b.id for b in oai.batches.list(limit=100)]

    batch = wait_batch(oai, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (40, 40, 0)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.error_file_id is None and batch.model == default_model
    out = oai.files.retrieve(batch.output_file_id)
    assert out.purpose == "batch_output" and out.filename == f"{batch.id}_output.jsonl"

    results = {r["custom_id"]: r for r in read_file(oai, batch.output_file_id)}
    assert sorted(results) == sorted(line["custom_id"] for line in lines)
    prompt_tokens = completion_tokens = 0
    for r in results.values():
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == default_model
        assert body["choices"][0]["message"]["content"].strip()
        assert 8 < body["usage"]["prompt_tokens"] and 0 < body["usage"]["completion_tokens"] <= 12
        prompt_tokens += body["usage"]["prompt_tokens"]
        completion_tokens += body["usage"]["completion_tokens"]
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt_tokens, completion_tokens)
    # Greedy decoding: the same question gets the same answer wherever its line ran.
    same = {results[f"chat-{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in (2, 10, 18, 26)}
    assert len(same) == 1


@pytest.fixture(scope="module")
def completions_batch(oai, default_model):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": default_model, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4, "temperature": 0}}
             for i in range(10)]
    batch = oai.batches.create(input_file_id=upload(oai, jsonl(lines)), endpoint="/v1/completions",
                               completion_window="24h")
    return wait_batch(oai, batch.id)


@pytest.mark.slow
def test_completions_batch(oai, completions_batch):
    batch = completions_batch
    assert batch.status == "completed" and batch.request_counts.completed == 10
    results = read_file(oai, batch.output_file_id)
    assert sorted(r["custom_id"] for r in results) == sorted(f"c{i}" for i in range(10))
    for r in results:
        body = r["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith(" 6")
        assert body["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_bad_lines_are_reported_in_the_error_file_and_the_rest_run(oai, default_model):
    lines = [
        chat_line("ok-0", "Name a planet.", max_tokens=6),
        b'{"custom_id": "broken", "method": "POST", ',
        chat_line("ok-1", "Name a color.", max_tokens=6),
        {**chat_line("bad-body", "hi"), "body": {"model": default_model, "messages": [], "max_tokens": "5"}},
        chat_line("no-model", "hi", model="no-such-model"),
        {**chat_line("wrong-url", "hi"), "url": "/v1/completions"},
        chat_line("ok-2", "Name a fruit.", max_tokens=6),
    ]
    batch = oai.batches.create(input_file_id=upload(oai, jsonl(lines)), endpoint="/v1/chat/completions",
                               completion_window="24h")
    batch = wait_batch(oai, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 3, 4)
    assert batch.errors is None
    assert sorted(r["custom_id"] for r in read_file(oai, batch.output_file_id)) == ["ok-0", "ok-1", "ok-2"]
    errors = read_file(oai, batch.error_file_id)
    assert len(errors) == 4
    by_id = {e["custom_id"]: e for e in errors}
    broken = by_id[None]
    assert broken["response"] is None and broken["error"]["code"] == "invalid_json" and broken["error"]["line"] == 2
    assert by_id["wrong-url"]["response"] is None and by_id["wrong-url"]["error"]["code"] == "mismatched_url"
    bad = by_id["bad-body"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["type"] == "invalid_request_error"
    missing = by_id["no-model"]
    assert missing["error"] is None and missing["response"]["status_code"] == 404
    assert missing["response"]["body"]["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_cancel_a_running_batch_keeps_what_finished(oai, http, default_model):
    lines = [chat_line(f"long-{i}", f"Write a short story about the number {i}.", max_tokens=32) for i in range(300)]
    file_id = upload(oai, jsonl(lines))
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_batch(oai, batch.id, statuses=("in_progress", *FINAL))
    assert batch.status == "in_progress" and batch.request_counts.total == 300

    def in_flight() -> int:
        return sum(r["load"]["in_flight"] or 0 for r in http.get(f"/v1/models/{default_model}").json()["replicas"])

    assert wait_until(lambda: in_flight() > 0, 60)  # its chunks are at the model

    with pytest.raises(openai.ConflictError) as exc:  # its input is needed until it ends
        oai.files.delete(file_id)
    assert error_body(exc.value)["code"] == "file_in_use"

    cancelled = oai.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    batch = wait_batch(oai, batch.id, timeout=60)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    counts = batch.request_counts
    assert counts.total == 300 and counts.completed + counts.failed < 300
    outputs, errors = read_file(oai, batch.output_file_id), read_file(oai, batch.error_file_id)
    assert (len(outputs), len(errors)) == (counts.completed, counts.failed)
    assert len({r["custom_id"] for r in outputs + errors}) == len(outputs) + len(errors)
    # The running chunks were stopped on the worker, not left to finish: the model is idle at once.
    assert wait_until(lambda: in_flight() == 0, 5)
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(batch.id)
    assert oai.files.delete(file_id).deleted


@pytest.mark.slow
def test_bad_input_gets_openai_errors(oai, http, server, completions_batch):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert error_body(exc.value)["param"] == "purpose"
    resp = http.post("/v1/files", content=b"{}", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"

    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        oai.files.content("file-nope")
    with pytest.raises(openai.NotFoundError):
        oai.files.delete("file-nope")
    with pytest.raises(openai.NotFoundError) as exc:
        oai.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert error_body(exc.value)["param"] == "input_file_id"
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        oai.batches.cancel("batch_nope")

    # An output file is not a batch's input.
    with pytest.raises(openai.BadRequestError) as exc:
        oai.batches.create(input_file_id=completions_batch.output_file_id, endpoint="/v1/completions",
                           completion_window="24h")
    assert "purpose 'batch'" in error_body(exc.value)["message"]

    file_id = upload(oai, jsonl([chat_line("a", "hi")]))
    with pytest.raises(openai.BadRequestError) as exc:
        oai.batches.create(input_file_id=file_id, endpoint="/v1/responses", completion_window="24h")
    assert "/v1/embeddings" in error_body(exc.value)["message"] and error_body(exc.value)["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="48h")
    assert error_body(exc.value)["param"] == "completion_window"
    for body in (b"not json", b"[1]", b'{"input_file_id": 5}'):
        resp = http.post("/v1/batches", content=body)
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    with pytest.raises(openai.BadRequestError):
        oai.batches.list(limit=1000)

    # A batch whose file has duplicate custom_ids fails at validation, as OpenAI's does.
    dup = upload(oai, jsonl([chat_line("same", "a"), chat_line("same", "b")]))
    batch = oai.batches.create(input_file_id=dup, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_batch(oai, batch.id, timeout=30)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.code, e.line) for e in batch.errors.data] == [("duplicate_custom_id", 2)]


@pytest.mark.slow
def test_file_list_pages_and_delete(oai, default_model):
    ids = [upload(oai, jsonl([chat_line(str(i), "hi")]), name=f"f{i}.jsonl") for i in range(3)]
    newest_first = [f.id for f in oai.files.list(purpose="batch") if f.id in ids]
    assert newest_first == ids[::-1]
    page = oai.files.list(purpose="batch", limit=1, after=ids[2])
    assert [f.id for f in page.data] == [ids[1]] and page.has_more
    deleted = oai.files.delete(ids[0])
    assert (deleted.id, deleted.deleted) == (ids[0], True)
    assert ids[0] not in [f.id for f in oai.files.list()]


@pytest.mark.slow
def test_an_upload_over_the_cap_gets_413(tmp_path):
    srv = LocalServer(tmp_path / "home", extra_env={"XDASK_BATCH_API__MAX_FILE_SIZE": "1000"})
    try:
        with openai.OpenAI(base_url=f"{srv.endpoint}/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as exc:
                client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
            assert exc.value.status_code == 413 and error_body(exc.value)["param"] == "file"
            assert client.files.create(file=("small.jsonl", b"x" * 900), purpose="batch").bytes == 900
            assert not list((tmp_path / "home" / "batches" / "files").glob(".upload-*"))
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_restarted_server_resumes_the_batch_without_losing_or_repeating(tmp_path: Path):
    home = tmp_path / "home"
    lines = [chat_line(f"r{i}", CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)], max_tokens=12) for i in range(64)]
    first = LocalServer(home)
    try:
        with httpx.Client(base_url=first.endpoint, timeout=300) as http:
            assert http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "gemma"}).status_code == 200
        with openai.OpenAI(base_url=f"{first.endpoint}/v1", api_key="unused", max_retries=0) as client:
            batch = client.batches.create(input_file_id=upload(client, jsonl(lines)),
                                          endpoint="/v1/chat/completions", completion_window="24h")
            assert wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 16, 300)
    finally:
        assert first.stop() in (0, -signal.SIGINT)
    state = json.loads((home / "batches" / "jobs" / f"{batch.id}.json").read_text())
    assert state["batch"]["status"] == "in_progress"
    before = [json.loads(line) for line in (home / "batches" / "files" / f"{state['output_file']}.jsonl").open()]
    assert 16 <= len(before) < 64

    second = LocalServer(home)
    try:
        with openai.OpenAI(base_url=f"{second.endpoint}/v1", api_key="unused", max_retries=0) as client:
            assert client.batches.retrieve(batch.id).status == "in_progress"  # waiting for its model
            with httpx.Client(base_url=second.endpoint, timeout=300) as http:
                assert http.post("/v1/models", json={**DEFAULT_LAUNCH, "model_uid": "gemma"}).status_code == 200
            final = wait_batch(client, batch.id)
            assert final.status == "completed", final
            assert (final.request_counts.completed, final.request_counts.failed) == (64, 0)
            outputs = read_file(client, final.output_file_id)
            assert sorted(r["custom_id"] for r in outputs) == sorted(line["custom_id"] for line in lines)
            assert outputs[:len(before)] == before  # kept as the first server wrote them, not run again
            assert all(r["response"]["body"]["choices"][0]["message"]["content"] for r in outputs)
    finally:
        second.stop()
