"""HTTP binding of the image API; the logic is ``xdask_server.image_serving``.

* ``POST /v1/images/generations``: OpenAI's JSON body (``prompt``, ``n`` 1-10,
  ``size`` "WxH", ``response_format`` url | b64_json) plus ``seed``,
  ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``.
* ``POST /v1/images/edits`` (OpenAI), ``/v1/images/variations`` (what
  Xinference's client calls) and ``/v1/images/image2image``: multipart with an
  ``image`` file and the same fields, plus ``strength``. A ``mask``
  (inpainting) is refused: xdask serves image-to-image only.
* ``GET /v1/images/files/{name}``: a generated PNG while it is retained
  (``xdask.image.retention-seconds``), then 404.

Examples
--------
>>> import openai                                                          # doctest: +SKIP
>>> oai = openai.OpenAI(base_url="http://127.0.0.1:9997/v1", api_key="x")
>>> img = oai.images.generate(model="sd-turbo", prompt="a fox", size="512x512", response_format="b64_json")
>>> edited = oai.images.edit(model="sd-turbo", image=open("fox.png", "rb"), prompt="a fox in snow")
"""

from __future__ import annotations

import asyncio

from xdask.api.media import ImageEditForm, ImageGenerationRequest
from xdask.errors import InvalidRequestError, NotFoundError
from xdask_server.base import BaseHandler, TaskHandler
from xdask_server.forms import UploadHandler
from xdask_server.image_serving import FILES_PATH, ImageServing


class _ImageHandler:
    """Mixin: the app's ``ImageServing`` and the base URL of links to generated files."""

    @property
    def images(self) -> ImageServing:
        return self.application.settings["images"]  # type: ignore[attr-defined]

    def base_url(self) -> str:
        request = self.request  # type: ignore[attr-defined]
        return f"{request.protocol}://{request.host}"


class GenerationsHandler(_ImageHandler, TaskHandler):
    """``POST /v1/images/generations``."""

    async def post(self) -> None:
        req = self.parse(ImageGenerationRequest)
        done, body = await self.run(self.images.generate(req, self.base_url()))
        if done:
            self.write_json(body)


class EditsHandler(_ImageHandler, UploadHandler):
    """``POST /v1/images/edits`` | ``variations`` | ``image2image`` (multipart: ``image`` + fields)."""

    limit_key = "image.max-upload-size"

    async def post(self) -> None:
        form = await self.form()
        if form.file("mask", required=False) is not None:
            raise InvalidRequestError("mask (inpainting) is not supported: xdask redraws the whole image",
                                      param="mask")
        image = form.file("image", "image[]") or b""  # required: a missing one is a 400 already
        req = ImageEditForm.model_validate(form.fields)
        done, body = await self.run(self.images.edit(req, image, self.request.path, self.base_url()))
        if done:
            self.write_json(body)


class ImageFileHandler(_ImageHandler, BaseHandler):
    """``GET /v1/images/files/{name}``: a generated PNG, while it is retained."""

    async def get(self, name: str) -> None:
        data = await asyncio.to_thread(self.images.store.read, name)
        if data is None:
            raise NotFoundError(f"Image {name} does not exist or has expired (images are kept "
                                f"{self.images.store.retention:g} s)", param="name", code="image_not_found")
        self.set_header("Content-Type", "image/png")
        self.set_header("Cache-Control", "private, max-age=60")
        self.finish(data)


def routes() -> list[tuple[str, type[BaseHandler]]]:
    """The routes this module serves (``app.make_app`` adds them)."""
    return [
        (r"/v1/images/generations", GenerationsHandler),
        (r"/v1/images/(?:edits|variations|image2image)", EditsHandler),
        (rf"{FILES_PATH}/([^/]+)", ImageFileHandler),
    ]
