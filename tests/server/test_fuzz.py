"""Fuzz: generated hostile requests against every endpoint family; all must get a 4xx, none a 5xx.

A seeded generator (``random.Random(SEED)``: the same cases every run, so a
failure reproduces) builds at least ``PER_FAMILY`` requests for each family:

- chat/completions, embeddings/rerank, images/audio, files/batches, models/registrations/cache;

each one invalid by construction: wrong types, huge values, deep JSON (10k
levels), huge strings, bad UTF-8, malformed multipart, header abuse, and path
traversal (``../../etc/passwd`` and encoded variants) in the file, image and
cache routes. Requests go out over raw sockets, so paths and headers reach
the server exactly as written (an HTTP library would normalise ``..`` away or
refuse bad bytes). Afterwards the server and the model still answer, and
nothing outside ``XDASK_HOME`` was touched.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SEED = 20261127
PER_FAMILY = 60
MODEL = "gemma"  # the session's default model (conftest.default_model)


@dataclass
class Case:
    family: str
    method: str
    path: bytes
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    why: str = ""

    def describe(self) -> str:
        return f"[{self.family}] {self.method} {self.path[:120]!r} ({self.why}) body={self.body[:80]!r}"


# -- hostile material ---------------------------------------------------------------------

DEEP_ARRAY = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
HUGE_STRING = "x" * 1_000_000
RAW_BODIES = [
    (DEEP_ARRAY, "10k-deep array"),
    (DEEP_OBJECT, "10k-deep object"),
    (b"\xff\xfe\xfd\x00\x80", "bad utf-8"),
    (b'{"model": "\xc3\x28", "x": "\xed\xa0\x80"}', "invalid utf-8 inside strings"),
    (b'{"model": "gemma", ', "truncated json"),
    (b'{"temperature": NaN, "max_tokens": Infinity}', "NaN and Infinity"),
    (b"null", "null"),
    (b"[]", "empty array"),
    (b'"just a string"', "a string"),
    (b"\x00" * 4096, "NUL bytes"),
    (b"1" * 5000, "a 5000-digit number"),
    (b'{"model": ' + b"9" * 5000 + b"}", "a 5000-digit integer field"),
    (b'{"a": "\\ud800\\udc00\\ud800"}', "lone surrogate escapes"),
    (b"{" + b'"k": 1, ' * 50_000 + b'"z": 1}', "50k keys"),
    (b"", "empty body"),
]
TRAVERSALS = [
    b"../../etc/passwd", b"..%2f..%2fetc%2fpasswd", b"%2e%2e%2f%2e%2e%2fetc%2fpasswd", b"%252e%252e%252fetc%252fpasswd",
    b"....//....//etc/passwd", b"..%5c..%5cwindows%5cwin.ini", b"%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
    b"file-%00", b"%ff%fe", b"\xff\xfe", b"..", b"%2e%2e", b"x" * 5000, b"%0d%0aSet-Cookie:%20x=1",
    b"etc%2fpasswd", b"~root", b"con", b"a%20b%09c",
]
HEADER_ABUSE: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("no extra headers", []),
    ("wrong content type", [(b"Content-Type", b"text/plain")]),
    ("multipart without a boundary", [(b"Content-Type", b"multipart/form-data")]),
    ("a 5000-byte boundary", [(b"Content-Type", b"multipart/form-data; boundary=" + b"b" * 5000)]),
    ("a charset that does not exist", [(b"Content-Type", b"application/json; charset=klingon")]),
    ("100 junk headers", [(f"X-Junk-{i}".encode(), b"v" * 50) for i in range(100)]),
    ("an 8 KB header", [(b"X-Big", b"h" * 8192)]),
    ("a garbage bearer token", [(b"Authorization", b"Bearer " + b"\xff" * 40)]),
    ("a non-UTF-8 header value", [(b"X-Name", b"\xc3\x28\xff")]),
    ("a strange Accept-Encoding", [(b"Accept-Encoding", b"gzip;q=2, *;q=-1, br, zstd" * 20)]),
    ("Expect: 100-continue", [(b"Expect", b"100-continue")]),
    ("a huge Host", [(b"X-Forwarded-Host", b"a" * 4000)]),
]
WRONG_STRING = [None, 5, 1.5, True, [], {}, ["a"], {"$ne": 1}]
WRONG_NUMBER = ["10", [], {}, "NaN", True, 10 ** 30, -(10 ** 30)]  # no None: optional numbers may be null


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "xdaskfuzz") -> tuple[bytes, bytes]:
    """A multipart body from ``(name, value, filename)`` parts, and its Content-Type."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}".encode()


# -- the generator ------------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def headers(self) -> tuple[str, list[tuple[bytes, bytes]]]:
        return self.pick(HEADER_ABUSE)

    def mutate(self, template: dict, wrong: dict[str, list]) -> tuple[bytes, str]:
        """``template`` with one field set to a value that is wrong for it, or a raw hostile body."""
        if self.rng.random() < 0.25:
            body, why = self.pick(RAW_BODIES)
            return body, why
        name = self.pick(sorted(wrong))
        value = self.pick(wrong[name])
        body = dict(template)
        if value is ...:
            body.pop(name, None)
            return _json(body), f"{name} missing"
        body[name] = value
        return _json(body), f"{name}={json.dumps(value)[:60]}"

    def json_case(self, family: str, method: str, path: str, template: dict, wrong: dict[str, list]) -> Case:
        body, why = self.mutate(template, wrong)
        label, headers = self.headers()
        if not any(k.lower() == b"content-type" for k, _ in headers):
            headers = [(b"Content-Type", b"application/json"), *headers]
        return Case(family, method, path.encode(), body, headers, f"{why}; {label}")


MESSAGES = [{"role": "user", "content": "Hi"}]
LAUNCH = {"model_name": "gemma-3-270m", "model_engine": "llama.cpp", "model_format": "ggufv2",
          "quantization": "Q4_K_M"}
CHAT_WRONG = {
    "model": [*WRONG_STRING, ..., "", "x" * 300, "../../etc/passwd", "no-such-model", "%2e%2e%2f"],
    "messages": [None, "hi", 5, [], [{}], [{"role": "user"}, {"role": "user", "content": "x"}],
                 [{"role": 5, "content": "x"}], [{"role": "wizard", "content": "x"}],
                 [{"role": "user", "content": {"$ne": 1}}], [[1]], [{"role": "user", "content": [{"type": "image"}]}],
                 [{"role": "user", "content": HUGE_STRING}], ...],
    "max_tokens": [-1, 0, 2 ** 63, 10 ** 12, *WRONG_NUMBER, 1.5],
    "temperature": [-1, 3, 1e308, *WRONG_NUMBER],
    "top_p": [0, -0.1, 2, *WRONG_NUMBER],
    "stream": ["yes", 2, [], {}, "true"],
    "stop": [5, [1, 2], ["x"] * 100, {"a": 1}, [None]],
    "n": [2, 0, -1, "1", 10 ** 9],
    "seed": [2 ** 70, -(2 ** 70), "7", 1.5],
    "presence_penalty": [5, -5, "x"],
    "stream_options": ["yes", 5, {"include_usage": "yes"}],
}
COMPLETION_WRONG = {
    **{k: v for k, v in CHAT_WRONG.items() if k != "messages"},
    "prompt": [None, 5, [1, 2, 3], [[1]], {}, ["a", "b"], [], "word " * 20000, ...],
    "echo": [True, "yes"],
    "logprobs": [-1, 100, "x"],
}


def chat_family(f: Fuzzer) -> Iterator[Case]:
    while True:
        if f.rng.random() < 0.5:
            yield f.json_case("chat", "POST", "/v1/chat/completions",
                              {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}, CHAT_WRONG)
        else:
            yield f.json_case("chat", "POST", "/v1/completions",
                              {"model": MODEL, "prompt": "Hi", "max_tokens": 4}, COMPLETION_WRONG)


def retrieval_family(f: Fuzzer) -> Iterator[Case]:
    # The session's model is an LLM: a request that passes validation still gets 400 wrong_model_type.
    embed_wrong = {"model": [*WRONG_STRING, ..., "", "x" * 300, "../../etc/passwd"],
                   "input": [None, 5, [[]], [1.5], {}, [], [""], ["x"] * 5000, [[1, 2]], ..., [HUGE_STRING, 5]],
                   "encoding_format": ["hex", 5, None, []], "dimensions": [-1, 0, "x", 1.5, 10 ** 30]}
    rerank_wrong = {"model": [*WRONG_STRING, ..., "../../etc/passwd"],
                    "query": [None, 5, {}, "", [], ...],
                    "documents": [None, "a", 5, [], [5], [{"txt": "a"}], ["a"] * 5000, [None], ...],
                    "top_n": [-1, 0, "x", 1.5], "return_documents": ["yes", 5]}
    while True:
        if f.rng.random() < 0.5:
            yield f.json_case("retrieval", "POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}, embed_wrong)
        else:
            yield f.json_case("retrieval", "POST", "/v1/rerank",
                              {"model": MODEL, "query": "q", "documents": ["a", "b"]}, rerank_wrong)


def media_family(f: Fuzzer) -> Iterator[Case]:
    gen_wrong = {"model": [*WRONG_STRING, ..., "../../etc/passwd"], "prompt": [None, 5, [], {}, "", ...],
                 "n": [0, 11, -1, "x", 10 ** 9], "size": ["0x0", "99999x99999", "abc", 5, "-8x-8", "64*64*64", "8x8"],
                 "response_format": ["gif", 5, None, []], "num_inference_steps": [-1, 10 ** 9, "x"],
                 "guidance_scale": ["x", [], 1e308]}
    speech_wrong = {"model": [*WRONG_STRING, ..., "../../etc/passwd"], "input": [None, 5, [], {}, ...],
                    "voice": [5, [], {}], "response_format": ["mp4", 5, []], "speed": [-1, 0, 100, "fast"]}
    while True:
        roll = f.rng.random()
        if roll < 0.25:
            yield f.json_case("media", "POST", "/v1/images/generations", {"model": MODEL, "prompt": "a fox"},
                              gen_wrong)
        elif roll < 0.4:
            yield f.json_case("media", "POST", "/v1/audio/speech", {"model": MODEL, "input": "hi", "voice": "a"},
                              speech_wrong)
        elif roll < 0.8:
            yield multipart_case(f, "media", f.pick(["/v1/images/edits", "/v1/images/variations",
                                                     "/v1/images/image2image", "/v1/audio/transcriptions",
                                                     "/v1/audio/translations"]))
        else:
            yield Case("media", f.pick(["GET", "DELETE"]), b"/v1/images/files/" + f.pick(TRAVERSALS),
                       why="traversal in an image file name")


def multipart_case(f: Fuzzer, family: str, path: str) -> Case:
    """A multipart upload that is wrong somewhere: a file that is not one, bad fields, framing, no file."""
    file_field = "image" if "images" in path else "file"
    junk_files = [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"RIFF\xff\xff\xff\xffWAVE", b"GIF89a" * 1000,
                  b"\xff" * 5000, b"RIFF" + b"\x00" * 40]
    roll = f.rng.random()
    parts: list[tuple[str, bytes, str | None]] = [("model", f.pick([MODEL.encode(), b"../../etc/passwd",
                                                                    b"\xff\xfe", b""]), None)]
    why = ""
    if roll < 0.3:
        parts.append((file_field, f.pick(junk_files), f.pick(["a.wav", "../../etc/passwd", "\u202e.png", ""])))
        why = "a file that is not what it says"
    elif roll < 0.45:
        parts.append((file_field, b"not a file", None))
        why = "the file sent as a text field"
    elif roll < 0.55:
        parts += [(file_field, b"RIFF", "a"), (file_field, b"RIFF", "b"), ("mask", b"x", "m.png")]
        why = "repeated file parts and a mask"
    elif roll < 0.7:
        parts += [(file_field, b"RIFF", "a.wav"), ("response_format", f.pick([b"mp3", b"\xff", b"x" * 70000]), None),
                  ("temperature", b"hot", None), ("n", b"-5", None), ("size", b"1x1", None)]
        why = "bad fields"
    else:
        why = "no file"
    body, content_type = _multipart(parts)
    if f.rng.random() < 0.3:  # break the framing
        body = f.pick([body[: len(body) // 2], body.replace(b"\r\n", b"\n"), body + b"trailing" * 100,
                       b"--xdaskfuzz\r\n" * 1000, body.replace(b"xdaskfuzz", b"other")])
        why += ", broken framing"
    label, headers = f.headers()
    if not any(k.lower() == b"content-type" for k, _ in headers):
        headers = [(b"Content-Type", content_type), *headers]
    return Case(family, "POST", path.encode(), body, headers, f"{why}; {label}")


def files_family(f: Fuzzer) -> Iterator[Case]:
    batch_wrong = {"input_file_id": [*WRONG_STRING, ..., "../../etc/passwd", "file-does-not-exist", "%2e%2e%2f"],
                   "endpoint": ["/v1/nothing", 5, None, "../../etc/passwd", ...],
                   "completion_window": ["1h", 5, None, "24h" * 1000],
                   "metadata": [5, "x", [1], {"k": {"deep": 1}}, {str(i): "v" for i in range(100)}]}
    while True:
        roll = f.rng.random()
        if roll < 0.3:
            yield f.json_case("files", "POST", "/v1/batches",
                              {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                               "completion_window": "24h"}, batch_wrong)
        elif roll < 0.55:
            parts: list[tuple[str, bytes, str | None]] = []
            choice = f.rng.randrange(4)
            if choice == 0:  # a purpose that is not batch
                parts = [("purpose", f.pick([b"fine-tune", b"\xff", b"", b"batch\x00"]), None),
                         ("file", b'{"a": 1}\n', "x.jsonl")]
            elif choice == 1:  # no file
                parts = [("purpose", b"batch", None)]
            elif choice == 2:  # the file as a text field
                parts = [("purpose", b"batch", None), ("file", b"{}", None)]
            else:  # no purpose, a traversal file name
                parts = [("file", b"{}\n", "../../../../etc/passwd")]
            body, content_type = _multipart(parts)
            if f.rng.random() < 0.3:
                body = body[: len(body) // 2]
            yield Case("files", "POST", b"/v1/files", body, [(b"Content-Type", content_type)],
                       f"bad upload #{choice}")
        else:
            target = f.pick(TRAVERSALS)
            method, path = f.pick([("GET", b"/v1/files/%s"), ("DELETE", b"/v1/files/%s"),
                                   ("GET", b"/v1/files/%s/content"), ("GET", b"/v1/batches/%s"),
                                   ("POST", b"/v1/batches/%s/cancel"), ("GET", b"/v1/files?limit=%s"),
                                   ("GET", b"/v1/batches?limit=%s")])
            if b"limit=" in path:
                target = f.pick([b"abc", b"1e9", b"%ff", b"9" * 400, b"-"])
            yield Case("files", method, path % target, why="traversal or bad id/limit")


def models_family(f: Fuzzer) -> Iterator[Case]:
    launch_wrong = {"model_name": [*WRONG_STRING, ..., "", "x" * 300, "../../etc/passwd", "no-such-family"],
                    "model_uid": ["../../x", "", "a b", "x" * 200, 5, "gemma"],  # "gemma" runs: 409
                    "replica": [0, -1, 10 ** 6, "2", 1.5],
                    "n_gpu": ["many", -1, [], {}, 1.5],
                    "gpu_idx": [[-1], "0", [[0]], {}],
                    "request_limits": [0, -1, "x", 1.5],
                    "download_hub": ["github", 5],
                    "model_engine": ["no-engine", 5, []],
                    "model_format": ["exe", 5]}
    register_wrong = {"model": [None, 5, [], "not json", "{", json.dumps({"model_name": "../../etc/x"}),
                                json.dumps({"model_name": "..", "model_specs": []}),
                                {"model_name": "a/b", "model_specs": [{"model_format": "ggufv2"}]},
                                {"model_name": "x" * 500}, "[" * 10_000],
                      "persist": ["yes", 5, []]}
    while True:
        roll = f.rng.random()
        if roll < 0.08:  # a real model from a hostile path: nothing there, or not a model
            path = f.pick(["../../etc/passwd", "/etc/passwd", "/etc", "/nonexistent/model.gguf", "\u0000",
                           "%2e%2e%2fetc%2fpasswd", "~root/.ssh/id_rsa", "/proc/self/environ"])
            yield Case("models", "POST", b"/v1/models", _json({**LAUNCH, "model_uid": "fuzz-path",
                                                               "model_path": path}),
                       [(b"Content-Type", b"application/json")], f"model_path={path!r}")
        elif roll < 0.3:
            case = f.json_case("models", "POST", "/v1/models",
                               {"model_name": "no-such-family", "model_uid": "fuzz-uid"}, launch_wrong)
            yield case
        elif roll < 0.45:
            yield f.json_case("models", "POST", "/v1/model_registrations/LLM",
                              {"model": json.dumps({"model_name": "fuzz"}), "persist": True}, register_wrong)
        elif roll < 0.75:
            target = f.pick(TRAVERSALS)
            method, path = f.pick([
                ("GET", b"/v1/models/%s"), ("DELETE", b"/v1/models/%s"), ("GET", b"/v1/models/%s/progress"),
                ("POST", b"/v1/models/%s/cancel"), ("GET", b"/v1/engines/%s"),
                ("GET", b"/v1/model_registrations/%s"), ("GET", b"/v1/model_registrations/LLM/%s"),
                ("DELETE", b"/v1/model_registrations/LLM/%s"), ("DELETE", b"/v1/cache/models?model_version=%s"),
                ("GET", b"/v1/cal_model_mem?model_name=%s"),
            ])
            yield Case("models", method, path % target, why="traversal or a name that does not exist")
        else:
            yield Case("models", f.pick(["GET", "DELETE"]), f.pick([
                b"/v1/cal_model_mem", b"/v1/cal_model_mem?model_name=gemma-3-270m&context_length=abc",
                b"/v1/cal_model_mem?model_name=gemma-3-270m&context_length=-5",
                b"/v1/cal_model_mem?model_name=gemma-3-270m&batch=0",
                b"/v1/cal_model_mem?model_name=gemma-3-270m&batch=-1",
                b"/v1/model_registrations/LLM/gemma-3-270m",  # built in: cannot be unregistered (DELETE)
                b"/v1/model_registrations/no-such-type",
            ]), why="bad query or a built-in family")


FAMILIES: dict[str, Callable[[Fuzzer], Iterator[Case]]] = {
    "chat": chat_family, "retrieval": retrieval_family, "media": media_family, "files": files_family,
    "models": models_family,
}


def generate(seed: int = SEED, per_family: int = PER_FAMILY) -> list[Case]:
    """The cases, the same for the same seed."""
    fuzzer = Fuzzer(seed)
    cases = []
    for family in FAMILIES.values():
        gen = family(fuzzer)
        cases += [next(gen) for _ in range(per_family)]
    return [c for c in cases if not (c.method == "GET" and c.path.startswith(b"/v1/model_registrations/LLM/")
                                     and c.path.endswith(b"gemma-3-270m"))]


# -- sending ------------------------------------------------------------------------------------


def send(port: int, case: Case, timeout: float = 120) -> tuple[int, bytes]:
    """Send ``case`` over a raw socket; the status code (0: no answer) and the start of the answer."""
    head = case.method.encode() + b" " + case.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    for name, value in case.headers:
        head += name + b": " + value + b"\r\n"
    head += b"Content-Length: " + str(len(case.body)).encode() + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head + case.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the body was read: the answer is still there to read
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    answer = b"".join(chunks)
    while answer.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the final one follows
        answer = answer.partition(b"\r\n\r\n")[2]
    try:
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    except (IndexError, ValueError):
        status = 0
    return status, answer[:600]


def test_the_generator_is_deterministic_and_big_enough() -> None:
    first, second = generate(), generate()
    assert [(c.method, c.path, c.body) for c in first] == [(c.method, c.path, c.body) for c in second]
    for family in FAMILIES:
        assert sum(c.family == family for c in first) >= 50, family


def test_hostile_requests_get_4xx(server, default_model: str, xdask_home: Path) -> None:
    assert default_model == MODEL
    outside = Path("/tmp") / "xdask-fuzz-canary"
    before = {p.name for p in Path("/etc").iterdir()}
    failures = []
    counts: dict[str, dict[int, int]] = {}
    for case in generate():
        status, answer = send(server.port, case)
        counts.setdefault(case.family, {}).setdefault(status, 0)
        counts[case.family][status] += 1
        if not 400 <= status < 500:
            failures.append(f"{status}: {case.describe()}\n    -> {answer[:300]!r}")
    for family, by_status in counts.items():
        print(f"fuzz {family}: " + ", ".join(f"{s}x{n}" for s, n in sorted(by_status.items())))
    Path(xdask_home.parent / "fuzz-failures.txt").write_text("\n".join(failures))
    assert not failures, f"{len(failures)} request(s) did not get a 4xx:\n" + "\n".join(failures[:40])
    # Alive, and the model still answers.
    with httpx.Client(base_url=server.endpoint, timeout=120) as client:
        assert client.get("/healthz").status_code == 200
        ok = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert client.get(f"/v1/models/{MODEL}").json()["state"] == "ready"
    assert server.proc.poll() is None
    # Nothing escaped XDASK_HOME: no registration or file was written through a traversal.
    assert {p.name for p in Path("/etc").iterdir()} == before
    assert not outside.exists()
    assert not list(xdask_home.parent.glob("etc*"))
