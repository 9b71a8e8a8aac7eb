"""``/v1/rerank`` with a tiny random BERT cross-encoder built offline, through the real server.

The model is registered as a custom rerank family pointing at its folder
(``model_uri``), launched on the sentence_transformers engine and compared
with ``CrossEncoder(<the same folder>).predict`` run in this process. Its
weights are random (``initializer_range=0.2`` spreads the scores), so the
tests check the API's arithmetic (sorting, ``top_n``, documents, tokens),
not relevance.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.servers import wait_until

pytest.importorskip("sentence_transformers", reason="pip install 'xdask[embedding]'")

pytestmark = pytest.mark.slow

UID = "tiny-reranker"
QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are yellow fruit rich in potassium.",
    "The stock market fell today as investors sold shares.",
    "Dask distributes Python computations over a cluster.",
    "A cross encoder reads the query and the document together.",
    "",
]


def family(name: str, folder: Path, kind: str = "normal") -> dict:
    return {"model_name": name, "type": kind, "language": ["en"], "max_tokens": 128,
            "model_specs": [{"model_format": "pytorch", "quantizations": ["none"], "model_uri": str(folder)}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_models import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"))


@pytest.fixture(scope="module")
def reranker(http: httpx.Client, folder: Path) -> str:
    resp = http.post("/v1/model_registrations/rerank", json={"model": json.dumps(family(UID, folder))})
    assert resp.status_code == 200, resp.text
    resp = http.post("/v1/models", json={"model_name": UID, "model_type": "rerank"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_engine"] == "sentence_transformers"
    yield resp.json()["model_uid"]
    http.delete(f"/v1/models/{UID}")
    http.delete(f"/v1/model_registrations/rerank/{UID}")


@pytest.fixture(scope="module")
def reference(folder: Path):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(folder), device="cpu")


def expected_scores(reference, query: str, docs: list[str]) -> np.ndarray:
    return np.asarray(reference.predict([(query, d) for d in docs]), dtype=np.float64)


def pair_tokens(reference, query: str, docs: list[str]) -> int:
    ids = reference.tokenizer([query] * len(docs), docs, truncation="longest_first", max_length=128)["input_ids"]
    return sum(len(row) for row in ids)


def rerank(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/rerank", json={"model": UID, "query": QUERY, "documents": DOCS, **body})


def test_the_running_reranker_describes_itself(http, reranker):
    info = http.get(f"/v1/models/{reranker}").json()
    assert info["model_type"] == "rerank" and info["type"] == "normal" and info["max_tokens"] == 128
    assert info["engine"]["backend"] == "sentence_transformers" and info["engine"]["max_length"] == 128


def test_scores_match_cross_encoder_predict_and_are_sorted(http, reranker, reference):
    body = rerank(http).json()
    assert body["id"] and len(body["results"]) == len(DOCS)
    expected = expected_scores(reference, QUERY, DOCS)
    assert len(set(np.round(expected, 4))) > 3  # the fixture's scores are spread, so sorting means something
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert sorted(got) == list(range(len(DOCS)))
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected, atol=1e-5)
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))
    assert all(r["document"] is None for r in body["results"])  # return_documents defaults to false
    assert body["meta"]["tokens"] == {"input_tokens": pair_tokens(reference, QUERY, DOCS), "output_tokens": 0}


def test_top_n_and_return_documents(http, reranker, reference):
    expected = expected_scores(reference, QUERY, DOCS)
    best = list(np.argsort(-expected, kind="stable"))
    body = rerank(http, top_n=2, return_documents=True).json()
    assert [r["index"] for r in body["results"]] == best[:2]
    assert [r["document"] for r in body["results"]] == [{"text": DOCS[i]} for i in best[:2]]
    everything = rerank(http, top_n=100).json()  # more than there are: all of them
    assert len(everything["results"]) == len(DOCS)


def test_documents_as_objects_and_xinference_extras(http, reranker):
    docs = [{"text": d} for d in DOCS[:3]]
    plain = rerank(http, documents=DOCS[:3]).json()
    body = http.post("/v1/rerank", json={"model": UID, "query": QUERY, "documents": docs, "return_documents": True,
                                         "max_chunks_per_doc": 4, "return_len": True, "kwargs": "{}"}).json()
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == \
        [(r["index"], r["relevance_score"]) for r in plain["results"]]
    assert {r["document"]["text"] for r in body["results"]} == set(DOCS[:3])


def test_long_documents_are_truncated_not_refused(http, reranker, reference):
    long_doc = "Paris France capital city " * 200
    body = http.post("/v1/rerank", json={"model": UID, "query": QUERY, "documents": [long_doc, DOCS[1]]})
    assert body.status_code == 200, body.text
    got = {r["index"]: r["relevance_score"] for r in body.json()["results"]}
    np.testing.assert_allclose([got[0], got[1]], expected_scores(reference, QUERY, [long_doc, DOCS[1]]), atol=1e-5)
    tokens = body.json()["meta"]["tokens"]["input_tokens"]
    assert tokens == pair_tokens(reference, QUERY, [long_doc, DOCS[1]]) and tokens <= 2 * 128


def test_concurrent_requests_share_model_calls(http, reranker, reference):
    queries = [f"question {i} about {'Paris' if i % 2 else 'bananas'}" for i in range(24)]
    before = http.get(f"/v1/models/{reranker}").json()["engine"]

    def one(query: str) -> dict[int, float]:
        resp = http.post("/v1/rerank", json={"model": UID, "query": query, "documents": DOCS[:4]})
        assert resp.status_code == 200, resp.text
        return {r["index"]: r["relevance_score"] for r in resp.json()["results"]}

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, queries))
    for query, got in zip(queries, answers, strict=True):
        np.testing.assert_allclose([got[i] for i in range(4)], expected_scores(reference, query, DOCS[:4]),
                                   atol=1e-5)
    after = http.get(f"/v1/models/{reranker}").json()["engine"]
    assert after["batched_items"] - before["batched_items"] == 24 * 4
    assert after["batches"] - before["batches"] < 24


BAD = [
    # (name, body changes, param, words in the message)
    ("no documents", {"documents": ...}, "documents", "Field required"),
    ("empty documents", {"documents": []}, "documents", "must not be empty"),
    ("too many documents", {"documents": ["d"] * 1001}, "documents", "at most 1000"),
    ("a number as document", {"documents": ["a", 3]}, "documents", "item 1 must be a string"),
    ("an object without text", {"documents": [{"body": "x"}]}, "documents", "item 0 must be a string"),
    ("documents not a list", {"documents": "one doc"}, "documents", "must be a list"),
    ("top_n zero", {"top_n": 0}, "top_n", "greater than or equal to 1"),
    ("top_n negative", {"top_n": -3}, "top_n", "greater than or equal to 1"),
    ("top_n as a string", {"top_n": "2"}, "top_n", "integer"),
    ("no query", {"query": ...}, "query", "Field required"),
    ("empty query", {"query": ""}, "query", "at least 1 character"),
    ("return_documents as a string", {"return_documents": "yes"}, "return_documents", "boolean"),
]


@pytest.mark.parametrize(("name", "changes", "param", "words"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_an_openai_style_400(http, reranker, name, changes, param, words):
    body = {k: v for k, v in {"model": UID, "query": QUERY, "documents": DOCS, **changes}.items() if v is not ...}
    resp = http.post("/v1/rerank", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err


def test_wrong_model_types_are_400s(http, reranker, default_model):
    on_llm = http.post("/v1/rerank", json={"model": default_model, "query": QUERY, "documents": DOCS})
    assert on_llm.status_code == 400 and on_llm.json()["error"]["code"] == "wrong_model_type"
    embed = http.post("/v1/embeddings", json={"model": reranker, "input": "hi"})
    assert embed.status_code == 400 and embed.json()["error"]["code"] == "wrong_model_type"
    chat = http.post("/v1/chat/completions", json={"model": reranker, "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "wrong_model_type"
    unknown = http.post("/v1/rerank", json={"model": "no-such-reranker", "query": QUERY, "documents": DOCS})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_xinference_client_reranks(server, reranker, reference):
    from xinference_client import RESTfulClient

    handle = RESTfulClient(server.endpoint).get_model(reranker)
    assert type(handle).__name__ == "RESTfulRerankModelHandle"
    body = handle.rerank(DOCS[:3], QUERY, top_n=2, return_documents=True)
    expected = expected_scores(reference, QUERY, DOCS[:3])
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))[:2]


def test_python_client_reranks_with_xinference_argument_order(server, reranker, reference):
    from xdask import Client

    with Client(server.endpoint) as client:
        handle = client.get_model(reranker)
        body = handle.rerank(DOCS[:4], QUERY, top_n=3, return_documents=True)
    best = list(np.argsort(-expected_scores(reference, QUERY, DOCS[:4]), kind="stable"))[:3]
    assert [r["index"] for r in body["results"]] == best
    assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in best]


def test_an_llm_based_reranker_is_refused_at_launch(http, folder):
    name = "tiny-llm-reranker"
    assert http.post("/v1/model_registrations/rerank",
                     json={"model": family(name, folder, "LLM-based")}).status_code == 200
    try:
        resp = http.post("/v1/models", json={"model_name": name, "model_type": "rerank"})
        assert resp.status_code == 400, resp.text
        assert "cross-encoders" in resp.json()["error"]["message"]
        assert name not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    finally:
        http.delete(f"/v1/model_registrations/rerank/{name}")


def test_terminate_frees_the_reranker(http, folder, reference):
    name = "tiny-reranker-2"
    assert http.post("/v1/model_registrations/rerank", json={"model": family(name, folder)}).status_code == 200
    try:
        assert http.post("/v1/models", json={"model_name": name, "model_type": "rerank"}).status_code == 200
        ok = http.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCS[:2]})
        assert ok.status_code == 200
        assert http.delete(f"/v1/models/{name}").json()["deleted"] is True
        assert wait_until(lambda: name not in {m["id"] for m in http.get("/v1/models").json()["data"]}, 30)
        gone = http.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCS[:2]})
        assert gone.status_code == 404
    finally:
        http.delete(f"/v1/model_registrations/rerank/{name}")
