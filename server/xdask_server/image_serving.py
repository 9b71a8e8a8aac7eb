"""Engine-agnostic logic of the image endpoints: validated request in, OpenAI ``ImagesResponse`` body out.

No Tornado here (the HTTP binding is ``xdask_server.images``). Each call
checks the model is an image model (400 ``wrong_model_type``), sends one
``invoke`` to a replica (``text_to_image`` or ``image_to_image``; a model
whose family lacks the ability answers 400 ``wrong_model_type`` too) and
turns the PNG bytes that come back into ``b64_json`` items or into files of
the ``ImageStore`` linked by ``url`` items.

Examples
--------
>>> serving = ImageServing(supervisor, ImageStore.from_config())                       # doctest: +SKIP
>>> req = ImageGenerationRequest.model_validate({"model": "sd-turbo", "prompt": "a fox",
...                                              "response_format": "b64_json"})
>>> body = await serving.generate(req, base_url="http://127.0.0.1:9997")
>>> sorted(body["data"][0])
['b64_json', 'revised_prompt']
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING, Any

from xdask import config
from xdask.api.media import ImageEditForm, ImageGenerationRequest
from xdask_server.image_store import ImageStore
from xdask_server.serving import OpenAIServing
from xdask_server.stats import RequestStats

if TYPE_CHECKING:
    from xdask.cluster.supervisor import Supervisor

#: The route image files are served at (``images.ImageFileHandler``).
FILES_PATH = "/v1/images/files"


class ImageServing:
    """Image requests against the models of a ``Supervisor``, counted in ``stats``."""

    def __init__(self, supervisor: Supervisor, store: ImageStore, stats: RequestStats | None = None):
        self.supervisor = supervisor
        self.store = store
        self.stats = stats if stats is not None else RequestStats()
        self._requests = OpenAIServing(supervisor, self.stats)

    async def generate(self, req: ImageGenerationRequest, base_url: str) -> dict[str, Any]:
        """The body of ``POST /v1/images/generations``."""
        return await self._run(req.model, "/v1/images/generations", "text_to_image", req.payload(),
                               req.response_format, base_url)

    async def edit(self, form: ImageEditForm, image: bytes, endpoint: str, base_url: str) -> dict[str, Any]:
        """The body of ``POST /v1/images/edits`` (and Xinference's ``variations``): the image redrawn."""
        return await self._run(form.model, endpoint, "image_to_image", {**form.payload(), "image": image},
                               form.response_format, base_url)

    async def _run(self, uid: str, endpoint: str, op: str, payload: dict[str, Any], response_format: str,
                   base_url: str) -> dict[str, Any]:
        result = await self._requests.invoke(uid, "image", endpoint, op, payload)
        images: list[bytes] = result["images"]
        if response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None} for png in images]
        else:
            names = await asyncio.to_thread(lambda: [self.store.save(png) for png in images])
            prefix = (config.get("image.public-url") or base_url).rstrip("/")
            data = [{"url": f"{prefix}{FILES_PATH}/{name}", "revised_prompt": None} for name in names]
        return {"created": int(time.time()), "data": data,
                "size": f"{result['width']}x{result['height']}", "output_format": "png"}
