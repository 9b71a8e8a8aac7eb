"""``xdask.Client``: the Python client of an xdask server's HTTP API.

Examples
--------
>>> from xdask import Client                                   # doctest: +SKIP
>>> client = Client("http://127.0.0.1:9997")
>>> uid = client.launch_model("gemma-3-270m", model_engine="llama.cpp")
>>> model = client.get_model(uid)
>>> model.chat([{"role": "user", "content": "Hi"}], max_tokens=16)["choices"][0]["message"]["content"]
>>> for chunk in model.chat("Tell me a story", stream=True):
...     print(chunk["choices"][0]["delta"].get("content", ""), end="")
>>> answers = model.chat_batch(["Hi", "2+2?"], max_tokens=16).answers()   # Dask futures, see chat_batch
>>> client.terminate_model(uid)
>>> embedder = client.get_model(client.launch_model("all-MiniLM-L6-v2", model_type="embedding"))
>>> len(embedder.create_embedding(["hello", "world"])["data"][1]["embedding"])
384
>>> vectors = embedder.embed_batch(texts).answers()                        # one vector per text
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import httpx
import pydantic

from xdask import config
from xdask.api.base import validation_error
from xdask.api.models import LaunchModelRequest
from xdask.errors import PermissionDeniedError, XdaskError, from_dict

if TYPE_CHECKING:
    import distributed

    from xdask.batch.futures import BatchFutures


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text or response.reason_phrase}
    raise from_dict(body, response.status_code)


def _sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Decoded ``data:`` events of a server-sent-events response, up to ``[DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise from_dict(event, 500)
        yield event


class ModelHandle:
    """A running model: ``chat``, ``generate``, ``create_embedding``, ``rerank``, ``text_to_image``,
    ``image_to_image``, ``transcriptions``, ``translations``, ``speech``, ``describe`` and batches."""

    def __init__(self, client: Client, uid: str, description: dict[str, Any]):
        self._client = client
        self.uid = uid
        self.description = description

    def __repr__(self) -> str:
        return f"<ModelHandle {self.uid} {self.description.get('model_name')}>"

    def _post(self, path: str, body: dict[str, Any], stream: bool) -> Any:
        if not stream:
            resp = self._client._http.post(path, json=body)
            _raise_for_error(resp)
            return resp.json()
        return self._stream(path, body)

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client._http.stream("POST", path, json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for_error(resp)
            yield from _sse_events(resp)

    def chat(
        self,
        messages: list[dict[str, Any]] | str,
        generate_config: dict[str, Any] | None = None,
        *,
        stream: bool = False,
        **params: Any,
    ) -> Any:
        """``POST /v1/chat/completions``; a string is one user message.

        ``generate_config`` (Xinference's name) and keyword params are merged.
        Returns the response dict, or an iterator of chunks with ``stream=True``.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {**(generate_config or {}), **params, "model": self.uid, "messages": messages}
        stream = bool(body.pop("stream", stream))
        body["stream"] = stream
        return self._post("/v1/chat/completions", body, stream)

    def generate(
        self, prompt: str, generate_config: dict[str, Any] | None = None, *, stream: bool = False, **params: Any
    ) -> Any:
        """``POST /v1/completions`` with one prompt."""
        body = {**(generate_config or {}), **params, "model": self.uid, "prompt": prompt}
        stream = bool(body.pop("stream", stream))
        body["stream"] = stream
        return self._post("/v1/completions", body, stream)

    def create_embedding(self, input: str | list[str], **params: Any) -> dict[str, Any]:
        """``POST /v1/embeddings``: OpenAI's ``list`` body (``encoding_format``, ``dimensions``, ``user`` in params)."""
        return self._post("/v1/embeddings", {**params, "model": self.uid, "input": input}, False)

    def rerank(
        self,
        documents: list[str | dict[str, Any]],
        query: str,
        top_n: int | None = None,
        max_chunks_per_doc: int | None = None,
        return_documents: bool | None = None,
        return_len: bool | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """``POST /v1/rerank`` with Xinference's argument order: results sorted by relevance, best first."""
        body = {"top_n": top_n, "max_chunks_per_doc": max_chunks_per_doc, "return_documents": return_documents,
                "return_len": return_len, **params}
        body = {k: v for k, v in body.items() if v is not None}
        return self._post("/v1/rerank", {**body, "model": self.uid, "query": query, "documents": documents}, False)

    def _form(self, path: str, fields: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> httpx.Response:
        """POST a multipart form (None fields left out, numbers as text, lists as repeated ``name[]``)."""
        data: dict[str, Any] = {}
        for name, value in fields.items():
            if value is None:
                continue
            if isinstance(value, list | tuple):
                data[f"{name}[]"] = [str(v) for v in value]
            else:
                data[name] = json.dumps(value) if isinstance(value, dict) else str(value)
        resp = self._client._http.post(path, data=data, files=files)
        _raise_for_error(resp)
        return resp

    def text_to_image(
        self, prompt: str, n: int = 1, size: str | None = None, response_format: str = "url", **kwargs: Any
    ) -> dict[str, Any]:
        """``POST /v1/images/generations``: ``{"created", "data": [{"url" | "b64_json", ...}]}``.

        ``size`` is "WIDTHxHEIGHT" (Xinference's "W*H" works too; None: the
        model's own); ``kwargs``: ``seed``, ``num_inference_steps``,
        ``guidance_scale``, ``negative_prompt``.
        """
        body = {**kwargs, "model": self.uid, "prompt": prompt, "n": n, "response_format": response_format}
        if size is not None:
            body["size"] = size
        return self._post("/v1/images/generations", body, False)

    def image_to_image(
        self,
        image: bytes,
        prompt: str,
        negative_prompt: str | None = None,
        n: int = 1,
        size: str | None = None,
        response_format: str = "url",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``POST /v1/images/edits``: ``image`` (PNG/JPEG/WebP bytes) redrawn after ``prompt``.

        ``size`` None keeps the image's own size (rounded down to multiples of
        8); ``kwargs``: ``strength``, ``seed``, ``num_inference_steps``, ``guidance_scale``.
        """
        fields = {**kwargs, "model": self.uid, "prompt": prompt, "negative_prompt": negative_prompt, "n": n,
                  "size": size, "response_format": response_format}
        return self._form("/v1/images/edits", fields, {"image": ("image.png", image)}).json()

    def transcriptions(
        self,
        audio: bytes,
        language: str | None = None,
        prompt: str | None = None,
        response_format: str = "json",
        temperature: float = 0.0,
        timestamp_granularities: list[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | str:
        """``POST /v1/audio/transcriptions`` of WAV bytes: a dict for json/verbose_json, text for text/srt/vtt."""
        return self._audio("/v1/audio/transcriptions", audio, language, prompt, response_format, temperature,
                           timestamp_granularities, kwargs)

    def translations(
        self,
        audio: bytes,
        language: str | None = None,
        prompt: str | None = None,
        response_format: str = "json",
        temperature: float = 0.0,
        timestamp_granularities: list[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | str:
        """``POST /v1/audio/translations``: speech in WAV bytes to English text; as ``transcriptions``."""
        return self._audio("/v1/audio/translations", audio, language, prompt, response_format, temperature,
                           timestamp_granularities, kwargs)

    def _audio(self, path: str, audio: bytes, language: str | None, prompt: str | None, response_format: str,
               temperature: float, granularities: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any] | str:
        fields = {**kwargs, "model": self.uid, "language": language, "prompt": prompt,
                  "response_format": response_format, "temperature": temperature,
                  "timestamp_granularities": granularities}
        resp = self._form(path, fields, {"file": ("audio.wav", audio)})
        return resp.json() if response_format in ("json", "verbose_json") else resp.text

    def speech(
        self, input: str, voice: str = "", response_format: str = "wav", speed: float = 1.0, **kwargs: Any
    ) -> bytes:
        """``POST /v1/audio/speech``: the audio bytes (``wav``, or ``pcm``: 16-bit 24 kHz mono samples)."""
        body = {**kwargs, "model": self.uid, "input": input, "voice": voice, "response_format": response_format,
                "speed": speed}
        resp = self._client._http.post("/v1/audio/speech", json=body)
        _raise_for_error(resp)
        return resp.content

    def describe(self) -> dict[str, Any]:
        return self._client.describe_model(self.uid)

    def _batch(self, kind: str, items: Sequence[Any], chunk_size: int | None, retries: int | None,
               params: dict[str, Any]) -> BatchFutures:
        from xdask.batch.futures import ready_concurrency, submit_batch

        concurrency = ready_concurrency(self.describe()["replicas"])
        return submit_batch(self._client.dask_client(), self.uid, kind, items, concurrency=concurrency,
                            chunk_size=chunk_size, retries=retries, **params)

    def chat_batch(
        self,
        items: Sequence[list[dict[str, Any]] | str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> BatchFutures:
        """Many chat requests as Dask futures, run inside the cluster (not through this server).

        Each item is a message list, a string (one user message) or a whole
        request body; ``params`` (``max_tokens``, ``temperature``, ...) apply
        to every item. Items go in chunks of ``chunk_size`` (default
        ``batch.chunk-size``, 0 = the model's concurrency) as Dask tasks; an
        item whose replica was lost is retried ``retries`` times
        (``batch.retries``). A bad item becomes an error outcome; bad
        ``params`` raise ``InvalidRequestError`` before anything runs.
        Needs ``Client.dask_client()`` (this process must reach the scheduler
        and workers). See ``xdask.batch.futures`` for the returned ``BatchFutures``.
        """
        return self._batch("chat", items, chunk_size, retries, params)

    def generate_batch(
        self,
        prompts: Sequence[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> BatchFutures:
        """Many completions (``/v1/completions`` bodies) as Dask futures; as ``chat_batch``."""
        return self._batch("completion", prompts, chunk_size, retries, params)

    def embed_batch(
        self,
        texts: Sequence[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> BatchFutures:
        """Many texts embedded as Dask futures, one request per text; as ``chat_batch``.

        A chunk's requests reach the model together, where the engine's
        dynamic batching runs them as few model calls. ``answers()`` gives
        one vector per text; ``params`` (``dimensions``, ``encoding_format``)
        apply to every item; a dict item is a whole ``/v1/embeddings`` body.
        """
        return self._batch("embedding", texts, chunk_size, retries, params)


class Client:
    """HTTP client of an xdask server (``XDASK_ENDPOINT`` by default).

    ``api_key`` is what a server with auth on needs: an API key (``sk-...``)
    or an access token. Left out, it is ``XDASK_API_KEY`` if set, else the
    token ``xdask login`` (or :meth:`login`) stored for this endpoint.
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = 1800.0, api_key: str | None = None):
        from xdask.auth.store import resolve_api_key

        self.endpoint = (endpoint or config.get("endpoint")).rstrip("/")
        self.api_key = resolve_api_key(self.endpoint, api_key)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.endpoint, timeout=timeout, headers=headers)
        self._dask: distributed.Client | None = None
        self._dask_lock = threading.Lock()

    def login(self, username: str, password: str, *, store: bool = False) -> dict[str, Any]:
        """Log in (``POST /token``) and send the token from now on; ``store`` keeps it as ``xdask login`` does.

        Returns ``{"access_token", "token_type", "expires_in"}``. Raises
        ``AuthenticationError`` (401) for a wrong username or password.
        """
        answer = self._request("POST", "/token", data={"username": username, "password": password})
        self.api_key = answer["access_token"]
        self._http.headers["Authorization"] = f"Bearer {self.api_key}"
        if store:
            from xdask.auth.store import save_token

            save_token(self.endpoint, self.api_key, username=username, expires_in=answer.get("expires_in"))
        return answer

    def auth_enabled(self) -> bool:
        """Whether the server requires credentials (``GET /v1/cluster/auth``)."""
        return bool(self._request("GET", "/v1/cluster/auth").get("auth"))

    def close(self) -> None:
        self._http.close()
        if self._dask is not None:
            self._dask.close()
            self._dask = None

    def dask_client(self) -> distributed.Client:
        """A ``distributed.Client`` to the server's Dask scheduler (as ``GET /status`` names it), made once.

        Batch futures and dask collections run as tasks on the cluster, so
        this process must reach the scheduler *and* the workers at the
        addresses they advertise (a laptop outside the cluster's network
        cannot; use the OpenAI Batch API there). Inside a Dask task it is the
        worker's own client (``distributed.get_client()``). The client made
        here becomes Dask's default, so ``.compute()`` on a collection from
        ``xdask.batch.map_chat`` runs on the cluster.
        """
        import distributed

        try:
            distributed.get_worker()
        except ValueError:
            pass
        else:
            return distributed.get_client()
        with self._dask_lock:
            if self._dask is None or self._dask.status in ("closing", "closed"):
                address = self._request("GET", "/status").get("scheduler")
                if not address:
                    raise PermissionDeniedError("The server shows its Dask scheduler only to callers with the "
                                                "models:list scope; this client's credential lacks it")
                self._dask = distributed.Client(address)
            return self._dask

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._http.request(method, path, **kwargs)
        _raise_for_error(resp)
        return resp.json()

    def launch_model(
        self,
        model_name: str,
        model_type: str = "LLM",
        model_engine: str | None = None,
        model_uid: str | None = None,
        model_size_in_billions: float | str | None = None,
        model_format: str | None = None,
        quantization: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Launch a model and wait until every replica is ready; returns its uid.

        Placement keywords: ``replica`` (copies on different GPUs/workers),
        ``n_gpu`` (count, ``"auto"``, or ``0`` for the CPU),
        ``gpu_idx`` (indices on the chosen worker), ``worker_ip`` /
        ``worker_address`` (pin), ``restart_on_failure``. Other keywords are
        engine options.
        """
        fields = {"model_name": model_name, "model_type": model_type, "model_engine": model_engine,
                  "model_uid": model_uid, "model_size_in_billions": model_size_in_billions,
                  "model_format": model_format, "quantization": quantization, **kwargs}
        try:  # the server's own schema: a bad value fails here as it would there, before anything is sent
            request = LaunchModelRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except pydantic.ValidationError as exc:
            raise validation_error(exc) from None
        payload = request.to_body()
        return self._request("POST", "/v1/models", json=payload)["model_uid"]

    def list_models(self) -> dict[str, dict[str, Any]]:
        """Running models by uid."""
        data = self._request("GET", "/v1/models")["data"]
        return {item["id"]: item for item in data}

    def describe_model(self, model_uid: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{model_uid}")

    def get_model(self, model_uid: str) -> ModelHandle:
        return ModelHandle(self, model_uid, self.describe_model(model_uid))

    def terminate_model(self, model_uid: str) -> None:
        self._request("DELETE", f"/v1/models/{model_uid}")

    def get_launch_progress(self, model_uid: str) -> dict[str, Any]:
        """A launch's ``state`` (downloading, loading, ready, ...), ``progress`` (0..1 of the download),
        bytes done and total, per file and per replica; callable while ``launch_model`` waits in another thread.
        """
        return self._request("GET", f"/v1/models/{model_uid}/progress")

    def cancel_launch(self, model_uid: str) -> dict[str, Any]:
        """Stop a launch in progress; its ``launch_model`` call raises ``LaunchCancelledError``."""
        return self._request("POST", f"/v1/models/{model_uid}/cancel")

    #: Xinference's names of the two methods above.
    get_launch_model_progress = get_launch_progress
    cancel_launch_model = cancel_launch

    def list_workers(self) -> list[dict[str, Any]]:
        """The cluster's workers: address, resources, GPUs used and free, replicas, memory."""
        return self._request("GET", "/v1/cluster/workers")["data"]

    def cluster_health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded" | "down", "problems": [...], ...}`` (no exception when unhealthy)."""
        resp = self._http.get("/v1/cluster/health")
        if resp.status_code not in (200, 503):
            _raise_for_error(resp)
        return resp.json()

    def query_engines(self, model_name: str) -> dict[str, list[dict[str, Any]]]:
        """Engine -> the specs of ``model_name`` it can run on the cluster (``available``, else ``reason``)."""
        return self._request("GET", f"/v1/engines/{model_name}")

    def list_cached_models(self, model_name: str | None = None) -> list[dict[str, Any]]:
        """Every worker's cached models: ``model_version``, format, ``size_bytes``, ``complete``, ``path``,
        ``address``."""
        params = {"model_name": model_name} if model_name else None
        return self._request("GET", "/v1/cache/models", params=params)["list"]

    def remove_cache(self, model_version: str) -> list[dict[str, Any]]:
        """Delete ``model_version`` from every worker's cache; per worker, the removed paths.

        Raises ``ConflictError`` (409) while a model uses it, ``NotFoundError`` if no worker has it.
        """
        return self._request("DELETE", "/v1/cache/models", params={"model_version": model_version})["removed"]

    def list_model_registrations(self, model_type: str = "LLM", detailed: bool = False) -> list[dict[str, Any]]:
        return self._request(
            "GET", f"/v1/model_registrations/{model_type}", params={"detailed": str(detailed).lower()}
        )

    def register_model(self, model_type: str, model: str | dict[str, Any], persist: bool = False) -> dict[str, Any]:
        """Register a custom family (its spec as JSON text or a dict); ``persist`` keeps it across restarts.

        Raises ``InvalidRequestError`` (400) for an invalid spec, ``ConflictError`` (409) if the name is taken.
        """
        return self._request("POST", f"/v1/model_registrations/{model_type}",
                             json={"model": model, "persist": persist})

    def unregister_model(self, model_type: str, model_name: str) -> dict[str, Any]:
        """Remove a custom family (and its persisted file); ``NotFoundError`` (404) if there is none."""
        return self._request("DELETE", f"/v1/model_registrations/{model_type}/{model_name}")


__all__ = ["Client", "ModelHandle", "XdaskError"]
