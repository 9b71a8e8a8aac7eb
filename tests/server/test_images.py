"""Image API through a real ``xdask-local`` and the official ``openai`` client, with a tiny diffusers model.

The model is a Stable Diffusion pipeline with random weights built offline
(``support.tiny_media_models.build_tiny_sd``), registered as a custom image family
pointing at its folder (``model_uri``) and launched on the diffusers engine.
The tests check the API (shapes, sizes, seeds, links, retention, errors), not
what the random model draws.

The module runs its own server (``support.media_server``) with a short image
retention (``XDASK_IMAGE__RETENTION_SECONDS``).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.media_server import MediaServer, media_server
from support.servers import engine_required, wait_until

if not engine_required("diffusers"):  # CI installs it: there a missing one fails
    pytest.importorskip("diffusers", reason="pip install 'xdask[image]'")

pytestmark = pytest.mark.slow

UID = "tiny-sd"
RETENTION = 6


def image_family(name: str, folder: Path, abilities: list[str]) -> dict:
    return {"model_name": name, "model_ability": abilities,
            "default_generate_config": {"num_inference_steps": 2},
            "model_specs": [{"model_format": "pytorch", "quantizations": ["none"], "model_uri": str(folder)}]}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaServer]:
    with media_server(tmp_path_factory.mktemp("xdask-images-home"), XDASK_IMAGE__RETENTION_SECONDS=str(RETENTION),
                      XDASK_IMAGE__CLEANUP_INTERVAL="0.5") as m:
        yield m


@pytest.fixture(scope="module")
def client(media: MediaServer) -> httpx.Client:
    return media.http


@pytest.fixture(scope="module")
def oai(media: MediaServer):
    return media.openai


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_media_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def model(client: httpx.Client, folder: Path) -> str:
    family = image_family(UID, folder, ["text2image", "image2image"])
    resp = client.post("/v1/model_registrations/image", json={"model": json.dumps(family)})
    assert resp.status_code == 200, resp.text
    resp = client.post("/v1/models", json={"model_name": UID, "model_type": "image"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_engine"] == "diffusers"
    return resp.json()["model_uid"]


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_the_running_model_describes_its_engine(client: httpx.Client, model: str):
    desc = client.get(f"/v1/models/{model}").json()
    assert desc["model_type"] == "image" and desc["model_ability"] == ["text2image", "image2image"]
    assert desc["engine"]["backend"] == "diffusers"
    assert desc["engine"]["device"] == "cpu" and desc["engine"]["dtype"] == "float32"
    assert desc["engine"]["ops"] == ["image_to_image", "text_to_image"]


def test_b64_json_gives_pngs_of_the_requested_size(oai, model: str):
    resp = oai.images.generate(model=model, prompt="a red fox", n=2, size="64x96", response_format="b64_json")
    assert len(resp.data) == 2 and resp.created > 0
    images = [base64.b64decode(item.b64_json) for item in resp.data]
    assert [png_size(img) for img in images] == [(64, 96), (64, 96)]
    assert images[0] != images[1]  # seeds s and s+1
    assert resp.data[0].revised_prompt is None and resp.data[0].url is None


def test_url_links_to_a_png_the_server_serves(oai, client: httpx.Client, model: str, media: MediaServer):
    resp = oai.images.generate(model=model, prompt="a lighthouse", size="128x64", response_format="url")
    url = resp.data[0].url
    assert url.startswith(f"{media.server.endpoint}/v1/images/files/") and url.endswith(".png")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert png_size(got.content) == (128, 64)


def test_default_size_and_response_format_are_the_models_and_url(client: httpx.Client, model: str):
    resp = client.post("/v1/images/generations", json={"model": model, "prompt": "a cat"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "url" in body["data"][0] and body["size"] == "64x64"  # the UNet's sample size x the VAE's factor


def test_the_same_seed_gives_the_same_bytes(oai, model: str):
    def draw(seed: int) -> bytes:
        resp = oai.images.generate(model=model, prompt="a tree", size="64x64", response_format="b64_json",
                                   extra_body={"seed": seed, "num_inference_steps": 2, "guidance_scale": 3.0,
                                               "negative_prompt": "blurry"})
        return base64.b64decode(resp.data[0].b64_json)

    first = draw(7)
    assert draw(7) == first
    assert draw(8) != first


def test_xinference_size_and_kwargs_shapes(client: httpx.Client, model: str):
    """Xinference's client sends ``size="W*H"`` and its extras as a JSON string in ``kwargs``."""
    body = {"model": model, "prompt": "a boat", "n": 1, "size": "64*64", "response_format": "b64_json",
            "kwargs": json.dumps({"seed": 3, "num_inference_steps": 1})}
    first = client.post("/v1/images/generations", json=body)
    assert first.status_code == 200, first.text
    again = client.post("/v1/images/generations", json=body)
    assert first.json()["data"][0]["b64_json"] == again.json()["data"][0]["b64_json"]


def test_image_to_image_with_openai_edits(oai, model: str):
    source = oai.images.generate(model=model, prompt="a house", size="64x64", response_format="b64_json")
    png = base64.b64decode(source.data[0].b64_json)
    edited = oai.images.edit(model=model, image=("house.png", png, "image/png"), prompt="a house in snow",
                             size="96x64", response_format="b64_json", extra_body={"strength": 0.6, "seed": 1})
    assert png_size(base64.b64decode(edited.data[0].b64_json)) == (96, 64)
    same_size = oai.images.edit(model=model, image=("house.png", png, "image/png"), prompt="at night",
                                response_format="b64_json")
    assert png_size(base64.b64decode(same_size.data[0].b64_json)) == (64, 64)  # the input's own size


def test_image_to_image_with_xinference_variations(client: httpx.Client, model: str):
    """Xinference's ``image_to_image`` posts to ``/v1/images/variations`` with a file named ``image``."""
    source = client.post("/v1/images/generations", json={"model": model, "prompt": "a cup", "size": "64x64",
                                                         "response_format": "b64_json"})
    png = base64.b64decode(source.json()["data"][0]["b64_json"])
    resp = client.post("/v1/images/variations",
                       data={"model": model, "prompt": "a mug", "n": "2", "response_format": "url",
                             "kwargs": json.dumps({"num_inference_steps": 2})},
                       files=[("image", ("image", png, "application/octet-stream"))])
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 2
    assert png_size(client.get(resp.json()["data"][1]["url"]).content) == (64, 64)


def test_retention_deletes_generated_files(oai, client: httpx.Client, model: str, media: MediaServer):
    url = oai.images.generate(model=model, prompt="a star", size="64x64", response_format="url").data[0].url
    path = url.split("/v1/images/files/")[1]
    stored = Path(media.server.env["XDASK_HOME"]) / "images" / path
    assert stored.exists()
    assert client.get(f"/v1/images/files/{path}").status_code == 200
    assert wait_until(lambda: not stored.exists(), timeout=RETENTION + 20)
    gone = client.get(f"/v1/images/files/{path}")
    assert gone.status_code == 404 and error_of(gone)["code"] == "image_not_found"
    assert client.get("/v1/images/files/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_python_clients(media: MediaServer, model: str):
    """``xdask.Client`` and Xinference's own client (``/v1/images/variations``, size ``W*H``, kwargs)."""
    from xinference_client import RESTfulClient

    from xdask.client import Client

    with Client(media.server.endpoint) as xd:
        handle = xd.get_model(model)
        out = handle.text_to_image("a fox", n=2, size="64x64", response_format="b64_json", seed=4)
        png = base64.b64decode(out["data"][0]["b64_json"])
        assert png_size(png) == (64, 64) and len(out["data"]) == 2
        edited = handle.image_to_image(png, "a fox at night", size="64x96", response_format="b64_json", strength=0.5)
        assert png_size(base64.b64decode(edited["data"][0]["b64_json"])) == (64, 96)
    xinf = RESTfulClient(media.server.endpoint).get_model(model)
    assert type(xinf).__name__ == "RESTfulImageModelHandle"
    made = xinf.text_to_image("a fox", size="64*64", response_format="b64_json", seed=4, num_inference_steps=2)
    assert png_size(base64.b64decode(made["data"][0]["b64_json"])) == (64, 64)
    redrawn = xinf.image_to_image(png, "a fox in snow", response_format="url", num_inference_steps=2)
    assert redrawn["data"][0]["url"].endswith(".png")


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"size": "100x100"}, "size", "multiple of 8"),
    ({"size": "64x4096"}, "size", "from 64 to 2048"),
    ({"size": "huge"}, "size", "not a size"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 11}, "n", "less than or equal to 10"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"response_format": "jpeg"}, "response_format", "'url' or 'b64_json'"),
    ({"n": "2"}, "n", "valid integer"),
    ({"kwargs": "not json"}, None, "kwargs must be a JSON object"),
])
def test_bad_generation_requests_are_400s(client: httpx.Client, model: str, body: dict, param, words: str):
    resp = client.post("/v1/images/generations", json={"model": model, "prompt": "a fox", **body})
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"]


def test_bad_edit_requests_are_400s(client: httpx.Client, model: str):
    fields = {"model": model, "prompt": "x"}
    missing = client.post("/v1/images/edits", data=fields, files=[("other", ("a.png", b"x"))])
    assert missing.status_code == 400 and error_of(missing)["param"] == "image"
    assert "image is required" in error_of(missing)["message"]
    not_image = client.post("/v1/images/edits", data=fields, files=[("image", ("a.png", b"hello world"))])
    assert not_image.status_code == 400 and error_of(not_image)["code"] == "invalid_image"
    mask = client.post("/v1/images/edits", data=fields,
                       files=[("image", ("a.png", b"x")), ("mask", ("m.png", b"x"))])
    assert mask.status_code == 400 and "inpainting" in error_of(mask)["message"]
    json_body = client.post("/v1/images/edits", json=fields)
    assert json_body.status_code == 400 and "multipart/form-data" in error_of(json_body)["message"]


def test_a_text2image_only_family_refuses_image_to_image(client: httpx.Client, folder: Path):
    family = image_family("tiny-sd-t2i", folder, ["text2image"])
    assert client.post("/v1/model_registrations/image", json={"model": family}).status_code == 200
    uid = client.post("/v1/models", json={"model_name": "tiny-sd-t2i", "model_type": "image"}).json()["model_uid"]
    try:
        resp = client.post("/v1/images/edits", data={"model": uid, "prompt": "x"},
                           files=[("image", ("a.png", b"\x89PNG"))])
        assert resp.status_code == 400 and error_of(resp)["code"] == "wrong_model_type"
        assert "text_to_image" in error_of(resp)["message"]
    finally:
        client.delete(f"/v1/models/{uid}")


def test_wrong_model_types_are_400s(client: httpx.Client, model: str, tiny_qwen2: Path):
    chat = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and error_of(chat)["code"] == "wrong_model_type"
    from support.tiny_media_models import tone_wav

    audio = client.post("/v1/audio/transcriptions", data={"model": model},
                        files=[("file", ("a.wav", tone_wav(0.5)))])
    assert audio.status_code == 400 and error_of(audio)["code"] == "wrong_model_type"
    llm = {"model_name": "img-test-llm", "model_ability": ["chat"], "context_length": 256,
           "model_specs": [{"model_format": "pytorch", "model_size_in_billions": "0_001", "quantizations": ["none"],
                            "model_uri": str(tiny_qwen2)}]}
    assert client.post("/v1/model_registrations/LLM", json={"model": llm}).status_code == 200
    resp = client.post("/v1/models", json={"model_name": "img-test-llm", "model_engine": "transformers", "n_gpu": None})
    assert resp.status_code == 200, resp.text
    uid = resp.json()["model_uid"]
    try:
        images = client.post("/v1/images/generations", json={"model": uid, "prompt": "a fox"})
        assert images.status_code == 400 and error_of(images)["code"] == "wrong_model_type"
        assert "LLM model" in error_of(images)["message"]
    finally:
        client.delete(f"/v1/models/{uid}")


def test_unknown_model_is_404(client: httpx.Client):
    resp = client.post("/v1/images/generations", json={"model": "no-such-model", "prompt": "a fox"})
    assert resp.status_code == 404


def test_terminate_frees_the_model(client: httpx.Client, folder: Path):
    family = image_family("tiny-sd-gone", folder, ["text2image"])
    assert client.post("/v1/model_registrations/image", json={"model": family}).status_code == 200
    uid = client.post("/v1/models", json={"model_name": "tiny-sd-gone", "model_type": "image"}).json()["model_uid"]

    def on_workers() -> set[str]:
        return {m.get("model_uid", m) if isinstance(m, dict) else m
                for w in client.get("/v1/cluster/workers").json()["data"] for m in w.get("models", [])}

    assert uid in on_workers()
    assert client.delete(f"/v1/models/{uid}").status_code == 200
    assert client.get(f"/v1/models/{uid}").status_code == 404
    assert uid not in on_workers()
    after = client.post("/v1/images/generations", json={"model": uid, "prompt": "a fox"})
    assert after.status_code == 404
