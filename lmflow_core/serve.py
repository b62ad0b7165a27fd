"""``lmflow serve``: an OpenAI-compatible API and a chat page for one model.

API (under ``/v1``): ``GET /v1/models`` and ``POST /v1/chat/completions``, with ``"stream": true`` answered as
server-sent events (``chat.completion.chunk`` objects, then ``data: [DONE]``). The chat page (Gradio) is mounted
at ``/`` and generates through the same engine, so the page, the API and ``lmflow chat`` all prompt the model in
the format it was trained with.

Everything a client can send is bounded and answered in OpenAI's error shape, never with a 500: the request
size (:mod:`lmflow_core.http_guard`, 413), the prompt against the model's context (400
``context_length_exceeded``), the time a request may take, the number of requests waiting (429). With an API key
nothing but ``/health`` answers without it. Requests share the model through :class:`lmflow_core.batching.Engine`
(continuous batching); a client that goes away stops its generation within one decoding step. On SIGTERM the
server finishes the requests in flight (up to ``shutdown_timeout``), answers new ones with 503, and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from .batching import Busy, Cancelled, Engine, TimedOut
from .errors import LmflowError
from .generate import GenerationOptions, prompt_inputs, reply_options, reply_prompt_ids
from .http_guard import Guard, error_body
from .inputs import IMAGE_PIXEL_LIMIT
from .report import note
from .templates import IMAGE_MARKER, IMAGE_PARTS

try:  # pydantic models are built at import time; this module is imported by `lmflow serve` only
    import uvicorn
    from fastapi import Request
    from pydantic import BaseModel, ConfigDict, Field, model_validator
except ImportError as exc:  # pragma: no cover - pydantic comes with fastapi
    raise LmflowError(
        "lmflow serve needs fastapi, uvicorn and gradio", "pip install 'lmflow[serve]'"
    ) from exc


@dataclass
class ServeSettings:
    """How ``lmflow serve`` serves; each field is the CLI flag of the same name.

    Attributes:
        host, port: where to listen (``127.0.0.1``: this machine only).
        api_key: required on every route but ``/health`` when set.
        max_new_tokens: cap on a request's ``max_tokens`` (``None``: up to the model's context).
        max_request_bytes: the largest request body (413 beyond).
        request_timeout: seconds a request may take, waiting included; its text so far is returned then
            (finish reason ``"length"``).
        max_batch_size: most requests decoded together (1: one at a time).
        max_waiting: most requests waiting for a place in the batch (429 beyond).
        shutdown_timeout: seconds SIGTERM waits for the requests in flight before cancelling them.
        ui: serve the chat page at ``/``.
        allow_local_images: a directory whose image files requests may name (a path or ``file://`` URL in an
            image part); ``None``: requests send images as ``data:`` URLs only.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_new_tokens: int | None = None
    max_request_bytes: int = 1024 * 1024
    request_timeout: float = 300.0
    max_batch_size: int = 16
    max_waiting: int = 256
    shutdown_timeout: float = 30.0
    ui: bool = True
    allow_local_images: str | None = None


class ContentPart(BaseModel):
    """A part of a message's content in OpenAI's list form: text and image parts are read, others ignored.

    An image part is ``{"type": "image_url", "image_url": {"url": ...}}`` (OpenAI's), or ``{"type": "image",
    "url"|"image"|"path": ...}``; the URL is a base64 ``data:`` URL, or a local path with ``allow_local_images``.
    """

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None
    url: str | None = None
    image: str | None = None
    path: str | None = None

    def image_source(self) -> Any:
        """Where an image part's image is: the first of ``path``, ``url``, ``image``, ``image_url``."""
        source = self.path or self.url or self.image or self.image_url
        return source.get("url") if isinstance(source, dict) else source


class ChatMessage(BaseModel):
    """One message of a request (text content; OpenAI's list-of-parts form with text parts is accepted)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(part.type in IMAGE_PARTS for part in self.content)


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that lmflow honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    n: int = Field(default=1, ge=1, le=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _unicode_text(self) -> ChatRequest:
        try:
            json.dumps(self.model_dump(), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"the request holds text that is not valid Unicode ({exc.object[exc.start : exc.end]!a}, a lone "
                "surrogate); send UTF-8 text"
            ) from None
        return self


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def offline_gradio() -> Any:
    """Gradio, imported with its analytics and version check off: serving sends nothing off the machine."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    import gradio

    return gradio


def check_port(host: str, port: int) -> None:
    """Fail before loading the model when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LmflowError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                "pass another --port, or stop what uses it",
            ) from exc


def new_tokens_for(prompt_tokens: int, requested: int | None, context: int | None, cap: int | None) -> int:
    """How many tokens a request may generate: what it asked for (or up to the context), within ``cap``.

    Raises :class:`RequestError` (400, ``context_length_exceeded``) when the prompt and the requested tokens do
    not fit in the model's context.
    """
    if context:
        wanted = prompt_tokens + (requested or 1)
        if wanted > context:
            asked = f"{prompt_tokens} in the messages, {requested} in the completion" if requested else None
            raise RequestError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested {wanted} "
                f"tokens ({asked or f'{prompt_tokens} in the messages'}). Please reduce the length of the "
                "messages" + (" or completion." if requested else "."),
                param="messages",
                code="context_length_exceeded",
            )
    room = requested or ((context - prompt_tokens) if context else (cap or 512))
    return min(room, cap) if cap else room


def request_options(request: ChatRequest, max_new_tokens: int) -> GenerationOptions:
    """GenerationOptions for a request: OpenAI's defaults (temperature 1 sampling), temperature 0 is greedy."""
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    temperature = 1.0 if request.temperature is None else request.temperature
    return GenerationOptions(
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        temperature=temperature or 1.0,
        top_k=0,
        top_p=request.top_p or 1.0,
        stop_strings=tuple(s for s in stops if s),
        seed=request.seed,
    )


#: The most pixels the images of one request may hold together (each image: ``IMAGE_PIXEL_LIMIT``).
REQUEST_PIXEL_LIMIT = 2 * IMAGE_PIXEL_LIMIT
#: The request body limit when the model reads images and ``--max-request-bytes`` is not given: room for a
#: few photos as base64 ``data:`` URLs (text-only servers keep 1 MiB).
IMAGE_REQUEST_BYTES = 32 * 2**20


class Server:
    """What the routes and the page share: the session, the engine, the settings."""

    def __init__(self, session: Any, settings: ServeSettings):
        self.session = session
        self.settings = settings
        self.engine = Engine(session, settings.max_batch_size, settings.max_waiting)
        root = settings.allow_local_images
        self.image_root = os.path.realpath(root) if root else None

    def request_messages(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """The messages of a request as conversation dicts, image parts read (:meth:`read_image`) and put in
        the text as image markers; raises :class:`RequestError` (400) for an image the server will not read."""
        images_seen = any(m.has_images() for m in messages)
        if images_seen and not self.session.reads_images:
            raise RequestError(
                400,
                f"messages: the request holds images, and the model {self.session.name} is served without a "
                "plugin that reads images; send text only, or serve a vision-language model with --plugins "
                "multimodal",
                param="messages",
            )
        out, pixels = [], 0
        for i, message in enumerate(messages):
            item: dict[str, Any] = {"role": message.role, "content": message.text()}
            if message.tool_calls:
                item["tool_calls"] = message.tool_calls
            if message.has_images():
                texts, images = [], []
                for j, part in enumerate(message.content):
                    if part.type == "text":
                        texts.append(part.text or "")
                    elif part.type in IMAGE_PARTS:
                        image = self.read_image(part.image_source(), f"messages.{i}.content.{j}")
                        pixels += image.width * image.height
                        if pixels > REQUEST_PIXEL_LIMIT:
                            raise RequestError(
                                400,
                                f"messages.{i}.content.{j}: the request's images hold more than "
                                f"{REQUEST_PIXEL_LIMIT // 1_000_000} megapixels together; send fewer or smaller "
                                "images",
                                param=f"messages.{i}.content.{j}",
                            )
                        texts.append(IMAGE_MARKER)
                        images.append(image)
                item["content"], item["images"] = "".join(texts), images
            out.append(item)
        return out

    def read_image(self, source: Any, where: str) -> Any:
        """The ``PIL.Image`` of an image part: a base64 ``data:`` URL, or (with ``allow_local_images``) a file
        under that directory. Web URLs are refused: the server fetches nothing."""
        from urllib.parse import unquote, urlparse

        from .inputs import image_from_data_url, read_image_file

        def refuse(message: str) -> RequestError:
            return RequestError(400, f"{where}: {message}", param=where)

        if not isinstance(source, str) or not source:
            raise refuse('an image part needs a URL: {"type": "image_url", "image_url": {"url": "data:..."}}')
        scheme = urlparse(source).scheme.lower() if ":" in source else ""
        try:
            if scheme == "data":
                return image_from_data_url(source, "the image")
            if scheme in ("http", "https"):
                raise refuse(
                    f"this server does not fetch images from the web ({source[:80]}); send the image as a base64 "
                    "data: URL"
                )
            if scheme not in ("", "file"):
                raise refuse(f"image URLs with scheme '{scheme[:20]}' are not read; send a base64 data: URL")
            if self.image_root is None:
                raise refuse(
                    "this server reads no local image paths; send the image as a base64 data: URL, or start "
                    "the server with --allow-local-images DIR"
                )
            path = unquote(urlparse(source).path) if scheme == "file" else source
            real = os.path.realpath(os.path.join(self.image_root, path))  # an absolute path stays absolute
            if os.path.commonpath([real, self.image_root]) != self.image_root:
                raise refuse(
                    f"{source[:200]} is outside the directory this server reads images from "
                    "(--allow-local-images); name a file under it"
                )
            return read_image_file(real)
        except LmflowError as exc:
            raise refuse(exc.one_line()) from None

    def prepare(
        self, messages: list[dict[str, Any]], tools: Any, system: str | None = None
    ) -> tuple[list[int], dict[str, Any]]:
        """The prompt ids of a conversation and its other model inputs (pixel values...); raises
        :class:`RequestError` (400) for what the template or a plugin refuses.

        A conversation with images is checked without them (its markers left as text): the template's rules
        (roles, system prompt, tools) still hold, and rendering the images is the ``format_conversation`` of the
        plugin that reads them, which raises (a 400 too) for what it cannot render.
        """
        import dataclasses

        from .templates import Conversation

        session = self.session
        try:
            conversation = Conversation.from_messages(messages, system, tools=tools)
            checked = conversation
            if conversation.images:
                plain = [dataclasses.replace(m, images=()) for m in conversation.messages]
                checked = dataclasses.replace(conversation, messages=plain)
            session.template.check(checked)
            ids = reply_prompt_ids(
                session.plugins.hook, session.template, conversation, session.tokenizer, session.config
            )
            inputs = prompt_inputs(
                session.plugins.hook, session.model, session.tokenizer, conversation, session.config
            )
            return ids, inputs
        except Exception as exc:  # whatever a template raises about a conversation is the client's to fix
            message = exc.one_line() if isinstance(exc, LmflowError) else str(exc) or type(exc).__name__
            raise RequestError(400, f"messages: {message}", param="messages") from None

    def submit(
        self,
        prompt_ids: list[int],
        options: GenerationOptions,
        inputs: dict[str, Any] | None = None,
        **callbacks: Any,
    ) -> Any:
        """Queue a generation; raises :class:`RequestError` 429 when too many requests wait."""
        session = self.session
        try:
            return self.engine.submit(
                prompt_ids,
                reply_options(session.template, session.tokenizer, options),
                timeout=self.settings.request_timeout,
                inputs=inputs,
                **callbacks,
            )
        except Busy as exc:
            raise RequestError(
                429, f"the server is busy ({exc}); retry in a moment", code="rate_limit_exceeded"
            ) from None


def create_app(session: Any, settings: ServeSettings | None = None, server: Server | None = None) -> Any:
    """The ASGI application serving ``session`` (a :class:`lmflow_core.inference.InferenceSession`): the API
    and the chat page behind a :class:`lmflow_core.http_guard.Guard`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    settings = settings or ServeSettings()
    server = server or Server(session, settings)
    app = FastAPI(title=f"lmflow: {session.name}", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    app.state.lmflow = server
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Any:
        return JSONResponse(status_code=status, content=error_body(status, message, param, code))

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError) -> Any:
        return error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON; send a JSON chat request")
        if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
            return error(400, "the request body is not a JSON object; send a JSON chat request")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Any:
        if exc.status_code == 400:  # FastAPI could not read the body at all (e.g. bytes that are not UTF-8)
            return error(400, "the request body is not valid JSON; send a JSON chat request")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> Any:
        return error(500, f"the server failed: {type(exc).__name__}: {exc}")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": session.name, "object": "model", "created": created, "owned_by": "lmflow"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        if body.model and body.model != session.name:
            raise RequestError(
                404, f"model '{body.model}' is not served here; this server serves '{session.name}'", "model"
            )
        if any(m.has_images() for m in body.messages):  # decoding images takes a while: not on the event loop
            messages = await asyncio.to_thread(server.request_messages, body.messages)
            prompt_ids, inputs = await asyncio.to_thread(server.prepare, messages, body.tools)
        else:
            prompt_ids, inputs = server.prepare(server.request_messages(body.messages), body.tools)
        requested = body.max_completion_tokens or body.max_tokens
        limit = new_tokens_for(len(prompt_ids), requested, session.context, settings.max_new_tokens)
        options = request_options(body, limit)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = server.submit(
            prompt_ids,
            options,
            inputs,
            on_text=(lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece))
            if body.stream
            else None,
            on_done=lambda: loop.call_soon_threadsafe(events.put_nowait, None),
        )
        if body.stream:
            return StreamingResponse(
                _stream(session.name, job, events, completion_id), media_type="text/event-stream"
            )
        if not await _finished_or_gone(job, events, request):
            return error(400, "the client closed the connection")  # nobody reads it
        if isinstance(job.error, TimedOut):
            raise RequestError(503, str(job.error))
        if job.error is not None:
            raise job.error
        result = job.result
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": session.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }

    api_routes = [route for route in app.routes if getattr(route, "path", "").startswith("/v1")]
    if settings.ui:
        gr = offline_gradio()
        app = gr.mount_gradio_app(
            app,
            chat_page(server),
            path="/",
            head=IMAGE_SCRIPT if session.reads_images else None,
            css=IMAGE_CSS if session.reads_images else None,
            run_history=False,
            max_file_size=1,  # nothing on the page uploads; the upload routes are refused anyway
            show_error=True,
        )
    return Guard(
        app,
        api_key=settings.api_key,
        max_request_bytes=settings.max_request_bytes,
        title=session.name,
        api_routes=("/v1", api_routes),
    )


async def _finished_or_gone(job: Any, events: asyncio.Queue, request: Any) -> bool:
    """Wait for ``job``; if the client disconnects first, cancel it and return False."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done = asyncio.ensure_future(events.get())
    gone = asyncio.ensure_future(disconnected())
    await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
    if done.done():
        gone.cancel()
        return True
    done.cancel()
    job.cancel()
    return False


def _chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(model: str, job: Any, events: asyncio.Queue, completion_id: str) -> Any:
    """Server-sent events: the role, the text as it is generated, the finish reason, then [DONE].

    An error after the stream started is sent as an event in OpenAI's error shape. When the client goes away,
    Starlette stops this generator and the job is cancelled.
    """
    try:
        yield _chunk(completion_id, model, {"role": "assistant", "content": ""})
        while (piece := await events.get()) is not None:
            yield _chunk(completion_id, model, {"content": piece})
        if job.error is not None:
            message = job.error.one_line() if isinstance(job.error, LmflowError) else str(job.error)
            body = error_body(500, f"generation failed: {type(job.error).__name__}: {message}")
            yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        else:
            yield _chunk(completion_id, model, {}, job.result.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once the job is done


def _history_text(content: Any) -> str:
    """Text of a chat-page history entry (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_history_text(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    return ""


#: The page's image picker: a file input read in the browser into a hidden text box as a ``data:`` URL, so the
#: image travels in the request like an API client's, and the framework's upload and file routes stay off.
IMAGE_PICKER = (
    '<label for="lmflow-image-file">Image for your next message</label> '
    '<input type="file" id="lmflow-image-file" accept="image/png,image/jpeg,image/gif,image/webp,image/bmp">'
)
IMAGE_SCRIPT = """<script>
document.addEventListener("change", (event) => {
  const input = event.target;
  if (!input || input.id !== "lmflow-image-file") return;
  const box = document.querySelector("#lmflow-image textarea");
  const put = (value) => { box.value = value; box.dispatchEvent(new Event("input", {bubbles: true})); };
  const file = input.files && input.files[0];
  if (!file) { put(""); return; }
  const reader = new FileReader();
  reader.onload = () => put(reader.result);
  reader.readAsDataURL(file);
});
document.addEventListener("keydown", (event) => {  // the image goes with this message: empty the picker
  if (event.key !== "Enter" || event.shiftKey || !event.target.closest("#lmflow-input")) return;
  const input = document.getElementById("lmflow-image-file");
  if (input) setTimeout(() => { input.value = ""; }, 0);
});
</script>"""
IMAGE_CSS = "#lmflow-image {display: none !important}"


def chat_page(server: Server) -> Any:
    """The Gradio chat page: multi-turn, streaming, with a system prompt and sampling controls; with a model
    that reads images, an image picker whose image goes with the next message (and stays with it)."""
    gr = offline_gradio()
    session, settings = server.session, server.settings
    most = settings.max_new_tokens or session.context or 512

    def generate(messages: list[dict[str, Any]], system: str, temperature: float, max_tokens: int) -> Any:
        try:
            parsed = server.request_messages([ChatMessage.model_validate(m) for m in messages])
            prompt_ids, inputs = server.prepare(parsed, None, system or None)
            wanted = int(max_tokens)
            if session.context and len(prompt_ids) < session.context:  # the slider is a wish: fit it in
                wanted = min(wanted, session.context - len(prompt_ids))
            limit = new_tokens_for(len(prompt_ids), wanted, session.context, settings.max_new_tokens)
            options = GenerationOptions(
                max_new_tokens=limit, greedy=temperature == 0, temperature=temperature or 1.0, top_k=0
            )
            pieces: queue.Queue = queue.Queue()
            job = server.submit(
                prompt_ids, options, inputs, on_text=pieces.put, on_done=lambda: pieces.put(None)
            )
        except RequestError as exc:
            raise gr.Error(exc.message) from None
        text = ""
        try:
            while (piece := pieces.get()) is not None:
                text += piece
                yield text
        finally:
            job.cancel()  # the page went away (or the job is done: then a no-op)
        if job.error is not None and not isinstance(job.error, Cancelled):
            raise gr.Error(str(job.error))
        yield job.result.text

    def history_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"role": m["role"], "content": _history_text(m["content"])}
            for m in history
            if m.get("role") in ("user", "assistant")
        ]

    def respond(
        message: str, history: list[dict[str, Any]], system: str, temperature: float, max_tokens: int
    ) -> Any:
        messages = [*history_messages(history), {"role": "user", "content": message}]
        yield from generate(messages, system, temperature, max_tokens)

    def respond_with_images(
        message: str,
        history: list[dict[str, Any]],
        system: str,
        temperature: float,
        max_tokens: int,
        image: str,
        images: dict[int, str],
    ) -> Any:
        # The page's history holds text only: each user turn's image is kept here, by the turn's number.
        images = dict(images or {})
        messages = history_messages(history)
        turn = sum(m["role"] == "user" for m in messages)
        images = {k: v for k, v in images.items() if k < turn}  # a retried or edited turn drops what followed
        if image:
            images[turn] = image
        messages.append({"role": "user", "content": message})
        user = 0
        for m in messages:
            if m["role"] == "user":
                if user in images:
                    m["content"] = [
                        {"type": "image_url", "image_url": {"url": images[user]}},
                        {"type": "text", "text": m["content"]},
                    ]
                user += 1
        for text in generate(messages, system, temperature, max_tokens):
            yield text, images, ""

    with gr.Blocks(title=f"lmflow: {session.name}", analytics_enabled=False) as page:
        gr.Markdown(
            f"## lmflow chat: {session.name}\nTemplate `{session.template_name}`. The API is at `/v1`."
        )
        system = gr.Textbox(label="System prompt", placeholder="Optional", render=False)
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)", render=False)
        max_tokens = gr.Slider(1, most, value=min(256, most), step=1, label="Max new tokens", render=False)
        extra: dict[str, Any] = {"additional_inputs": [system, temperature, max_tokens]}
        if session.reads_images:
            image = gr.Textbox(elem_id="lmflow-image", show_label=False, container=False, render=False)
            images = gr.State({})
            extra = {
                "additional_inputs": [system, temperature, max_tokens, image, images],
                "additional_outputs": [images, image],
            }
        gr.ChatInterface(
            respond_with_images if session.reads_images else respond,
            analytics_enabled=False,
            concurrency_limit=settings.max_batch_size,  # page users share the model as API clients do
            additional_inputs_accordion="Settings",
            textbox=gr.Textbox(
                placeholder="Type a message and press Enter", elem_id="lmflow-input", show_label=False
            ),
            chatbot=gr.Chatbot(elem_id="lmflow-chatbot", label=session.name, height=420),
            api_name="respond",
            **extra,
        )
        if session.reads_images:
            gr.HTML(IMAGE_PICKER, elem_id="lmflow-image-picker")
    return page


def make_server(session: Any, settings: ServeSettings) -> Any:
    """A uvicorn server for ``session`` that drains on SIGTERM/SIGINT (see :class:`DrainingServer`)."""
    if session.template is None:
        raise LmflowError(
            f"model {session.config.model} has no conversation template",
            "pass --template NAME (see `lmflow templates list`)",
        )
    server = Server(session, settings)
    app = create_app(session, settings, server)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=1
    )
    return DrainingServer(config, server, app)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a graceful stop: on the first SIGTERM or SIGINT new requests get 503, the requests
    in flight finish (at most ``shutdown_timeout`` seconds, then they are cancelled) and the process exits 0;
    a second signal stops at once."""

    def __init__(self, config: Any, server: Server, guard: Guard):
        super().__init__(config)
        self.lmflow = server
        self.guard = guard
        self.drain_thread: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain_thread is not None:  # the second signal
            self.lmflow.engine.cancel_all()
            self.should_exit = self.force_exit = True
            return
        self.guard.draining = True
        self.drain_thread = threading.Thread(target=self._drain, name="lmflow-drain", daemon=True)
        self.drain_thread.start()

    def _drain(self) -> None:
        engine = self.lmflow.engine
        deadline = time.monotonic() + self.lmflow.settings.shutdown_timeout
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.close()
        time.sleep(0.2)  # let the last responses leave
        # What still runs now is the chat page's idle event streams: uvicorn cancels them after
        # timeout_graceful_shutdown, which is expected here, not an error to report.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self.should_exit = True


def run_server(session: Any, settings: ServeSettings) -> None:
    """Serve until SIGTERM or Ctrl-C (then drain and return)."""
    server = make_server(session, settings)
    where = f"http://{settings.host}:{settings.port}"
    mode = (
        f"batches up to {settings.max_batch_size} requests"
        if server.lmflow.engine.batched
        else "one request at a time"
    )
    page = f"chat page {where}/ | " if settings.ui else ""
    key = " (key required)" if settings.api_key else ""
    print(
        f"lmflow serve | {session.name} | template {session.template_name} | {mode} | {page}API {where}/v1{key}",
        flush=True,
    )
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        note(
            f"serving on {settings.host} without a key: anyone who can reach this machine can use the model and "
            "the chat page; pass --api-key KEY (or set LMFLOW_API_KEY)"
        )
    server.run()


__all__ = ["ServeSettings", "check_port", "create_app", "make_server", "run_server"]
