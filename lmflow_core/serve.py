"""``lmflow serve``: an OpenAI-compatible API and a chat page for one model.

API (under ``/v1``): ``GET /v1/models`` and ``POST /v1/chat/completions``, with ``"stream": true`` answered as
server-sent events (``chat.completion.chunk`` objects, then ``data: [DONE]``). Malformed requests get a 4xx
JSON error in OpenAI's shape and the server keeps serving. With an API key, every ``/v1`` request needs
``Authorization: Bearer KEY``. The chat page (Gradio) is mounted at ``/`` and uses the same generation path, so
the page, the API and ``lmflow chat`` all prompt the model in the format it was trained with. One generation
runs at a time: requests queue for the model.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any, Literal

from .errors import LmflowError
from .generate import GenerationOptions, run_in_thread
from .http_guard import Guard

DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024

try:  # pydantic models are built at import time; this module is imported by `lmflow serve` only
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - pydantic comes with fastapi
    raise LmflowError(
        "lmflow serve needs fastapi, uvicorn and gradio", "pip install 'lmflow[serve]'"
    ) from exc


class ChatMessage(BaseModel):
    """One message of a request (text content; OpenAI's list-of-parts form with text parts is accepted)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


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
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list[dict[str, Any]] | None = None


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


def request_options(request: ChatRequest, default_max: int) -> GenerationOptions:
    """GenerationOptions for a request: OpenAI's defaults (temperature 1 sampling), temperature 0 is greedy."""
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    limit = request.max_completion_tokens or request.max_tokens or default_max
    temperature = 1.0 if request.temperature is None else request.temperature
    return GenerationOptions(
        max_new_tokens=min(limit, default_max),
        greedy=temperature == 0,
        temperature=temperature or 1.0,
        top_k=0,
        top_p=request.top_p or 1.0,
        stop_strings=stops,
        seed=request.seed,
    )


def create_app(
    session: Any,
    api_key: str | None = None,
    max_new_tokens: int = 512,
    ui: bool = True,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> Any:
    """The FastAPI application serving ``session`` (a :class:`lmflow_core.inference.InferenceSession`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from .templates import Conversation

    app = FastAPI(title=f"lmflow: {session.name}", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    lock = threading.Lock()
    created = int(time.time())

    def error(
        status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> Any:
        return JSONResponse(
            status_code=status,
            content={"error": {"message": message, "type": kind, "param": param, "code": None}},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(
            400,
            f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body",
            param=where or None,
        )

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Any:
        return error(
            exc.status_code,
            str(exc.detail),
            "not_found_error" if exc.status_code == 404 else "invalid_request_error",
        )

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": session.name, "object": "model", "created": created, "owned_by": "lmflow"}],
        }

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> Any:
        if request.model and request.model != session.name:
            return error(
                404,
                f"model '{request.model}' is not served here; this server serves '{session.name}'",
                "not_found_error",
                "model",
            )
        messages = [
            {"role": m.role, "content": m.text(), **({"tool_calls": m.tool_calls} if m.tool_calls else {})}
            for m in request.messages
        ]
        try:
            conversation = Conversation.from_messages(messages, tools=request.tools)
            session.template.check(conversation)
        except (LmflowError, KeyError, TypeError, ValueError) as exc:
            return error(400, f"messages: {exc}", param="messages")
        options = request_options(request, max_new_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if request.stream:
            return StreamingResponse(
                _stream(session, lock, conversation, options, completion_id), media_type="text/event-stream"
            )
        with lock:
            result = session.chat(conversation, options)
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
    if ui:
        gr = offline_gradio()
        app = gr.mount_gradio_app(
            app,
            chat_page(session, lock, max_new_tokens),
            path="/",
            run_history=False,
            max_file_size=1,  # nothing on the page uploads; the upload routes are refused anyway
            show_error=True,
        )
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_request_bytes=max_request_bytes,
        title=session.name,
        api_routes=("/v1", api_routes),
    )
    return app


def _chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _stream(
    session: Any, lock: threading.Lock, conversation: Any, options: GenerationOptions, completion_id: str
) -> Any:
    """Server-sent events: the role, the text as it is generated, the finish reason, then [DONE]."""
    pieces: queue.Queue = queue.Queue()
    yield _chunk(completion_id, session.name, {"role": "assistant", "content": ""})

    def work() -> Any:
        with lock:
            return session.chat(conversation, options, on_text=pieces.put)

    thread, box = run_in_thread(work)
    while thread.is_alive() or not pieces.empty():
        try:
            piece = pieces.get(timeout=0.05)
        except queue.Empty:
            continue
        yield _chunk(completion_id, session.name, {"content": piece})
    thread.join()
    if "error" in box:
        message = box["error"].one_line() if isinstance(box["error"], LmflowError) else repr(box["error"])
        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
    else:
        yield _chunk(completion_id, session.name, {}, box["result"].finish_reason)
    yield "data: [DONE]\n\n"


def _history_text(content: Any) -> str:
    """Text of a chat-page history entry (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_history_text(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    return ""


def chat_page(session: Any, lock: threading.Lock, max_new_tokens: int) -> Any:
    """The Gradio chat page: multi-turn, streaming, with a system prompt and sampling controls."""
    gr = offline_gradio()

    from .templates import Conversation

    def respond(
        message: str, history: list[dict[str, Any]], system: str, temperature: float, max_tokens: int
    ) -> Any:
        messages = [
            {"role": m["role"], "content": _history_text(m["content"])}
            for m in history
            if m.get("role") in ("user", "assistant")
        ]
        messages.append({"role": "user", "content": message})
        conversation = Conversation.from_messages(messages, system or None)
        options = GenerationOptions(
            max_new_tokens=int(max_tokens), greedy=temperature == 0, temperature=temperature or 1.0, top_k=0
        )
        pieces: queue.Queue = queue.Queue()

        def work() -> Any:
            with lock:
                return session.chat(conversation, options, on_text=pieces.put)

        thread, box = run_in_thread(work)
        text = ""
        while thread.is_alive() or not pieces.empty():
            try:
                text += pieces.get(timeout=0.05)
            except queue.Empty:
                continue
            yield text
        thread.join()
        if "error" in box:
            raise gr.Error(str(box["error"]))
        yield box["result"].text

    with gr.Blocks(title=f"lmflow: {session.name}", analytics_enabled=False) as page:
        gr.Markdown(
            f"## lmflow chat: {session.name}\nTemplate `{session.template_name}`. The API is at `/v1`."
        )
        system = gr.Textbox(label="System prompt", placeholder="Optional", render=False)
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)", render=False)
        max_tokens = gr.Slider(
            1, max_new_tokens, value=min(256, max_new_tokens), step=1, label="Max new tokens", render=False
        )
        gr.ChatInterface(
            respond,
            analytics_enabled=False,
            additional_inputs=[system, temperature, max_tokens],
            additional_inputs_accordion="Settings",
            textbox=gr.Textbox(
                placeholder="Type a message and press Enter", elem_id="lmflow-input", show_label=False
            ),
            chatbot=gr.Chatbot(elem_id="lmflow-chatbot", label=session.name, height=420),
        )
    return page


def run_server(
    session: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_new_tokens: int = 512,
    ui: bool = True,
) -> None:
    """Serve until interrupted."""
    import uvicorn

    if session.template is None:
        raise LmflowError(
            f"model {session.config.model} has no conversation template",
            "pass --template NAME (see `lmflow templates list`)",
        )
    app = create_app(session, api_key=api_key, max_new_tokens=max_new_tokens, ui=ui)
    where = f"http://{host}:{port}"
    print(
        f"lmflow serve | {session.name} | template {session.template_name} | chat page {where}/ | API {where}/v1",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
