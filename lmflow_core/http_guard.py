"""The gate in front of everything ``lmflow serve`` answers: key, body size, routes a client may reach, drain.

:class:`Guard` is a plain ASGI middleware wrapped around the whole application (the API and the mounted chat
page), so no route can be reached around it:

* With an API key, only ``GET /health`` and the login form answer without it. Other requests need
  ``Authorization: Bearer KEY`` or the session cookie the login form sets (for the browser page); a browser
  asking for a page is sent to the form, everything else gets a 401. Keys are compared with
  :func:`hmac.compare_digest`.
* Routes of the chat page's framework that no feature of the page needs (uploads, file serving, a proxy, run
  history, monitoring...) are refused, key or not: they could store files or reveal server paths.
* A request body larger than ``max_request_bytes`` is answered with 413 before anything parses it.
* While the server drains (after SIGTERM), new requests get a 503 and the health probe says ``draining``.

Every error is a JSON body in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import secrets
import urllib.parse
from collections.abc import Callable
from typing import Any

COOKIE = "lmflow_session"
LOGIN_PATH = "/login"
HEALTH_PATH = "/health"

# Routes of the mounted Gradio app that the chat page does not use; with or without the /gradio_api prefix.
BLOCKED_PREFIXES = (
    "/upload",
    "/file=",
    "/file/",
    "/proxy=",
    "/run-history",
    "/runs",
    "/monitoring",
    "/profiling",
    "/vibe-",
    "/undo-vibe-edit",
    "/process_recording",
    "/dev/",
    "/stream/",
    "/custom_component/",
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {
        "error": {
            "message": message,
            "type": kind or ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


async def send_json(
    send: Callable, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    """Answer with a JSON body."""
    data = json.dumps(body, ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def send_error(send: Callable, status: int, message: str, **fields: Any) -> None:
    """Answer with an error in OpenAI's shape."""
    headers = list(fields.pop("headers", ()))
    await send_json(send, status, error_body(status, message, **fields), headers)


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmflow: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:5rem auto;padding:0 1rem}}
input{{font-size:1rem;padding:.4rem;width:100%;box-sizing:border-box;margin:.5rem 0}}
button{{font-size:1rem;padding:.4rem 1rem}}.error{{color:#b00020}}</style></head>
<body><h2>lmflow: {title}</h2><p>This server needs its API key (<code>--api-key</code>).</p>{problem}
<form method="post" action="/login"><label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Sign in</button></form></body></html>
"""


class Guard:
    """ASGI middleware: see the module docstring.

    Args:
        app: the application to protect.
        api_key: the key, or ``None`` for an open server.
        max_request_bytes: the largest request body accepted.
        title: shown on the login form.
        api_routes: ``(prefix, routes)``: paths under ``prefix`` that match none of ``routes`` (Starlette routes)
            get a 404 in OpenAI's shape, and a known path with another method a 405.
    """

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        max_request_bytes: int,
        title: str = "",
        api_routes: tuple[str, list[Any]] | None = None,
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.title = title
        self.api_routes = api_routes
        self.session = secrets.token_urlsafe(32).encode()  # the browser's cookie; new on every start
        self.draining = False

    # ---- who may pass ------------------------------------------------------------------------------------

    def authorized(self, scope: dict[str, Any]) -> bool:
        if self.api_key is None:
            return True
        headers = dict(scope.get("headers") or ())
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.api_key):
            return True
        cookie = _cookie(headers.get(b"cookie", b""), COOKIE)
        return cookie is not None and hmac.compare_digest(cookie, self.session)

    # ---- the middleware ----------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "websocket":
            if self.draining or not self.authorized(scope) or _blocked(scope["path"]):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == HEALTH_PATH and method in ("GET", "HEAD"):
            status = 503 if self.draining else 200
            await send_json(send, status, {"status": "draining" if self.draining else "ok"})
            return
        if self.draining:
            await send_error(
                send,
                503,
                "the server is shutting down; retry on another instance or after it restarts",
                headers=[(b"connection", b"close"), (b"retry-after", b"5")],
            )
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replay = _replaying(body, receive)
        if self.api_key is not None and path == LOGIN_PATH:
            await self._login(scope, body, send)
            return
        if not self.authorized(scope):
            wants_page = b"text/html" in dict(scope.get("headers") or ()).get(b"accept", b"")
            if method == "GET" and wants_page and not self._is_api(path):
                target = urllib.parse.quote(path if path.startswith("/") else "/")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 303,
                        "headers": [(b"location", f"{LOGIN_PATH}?next={target}".encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            await send_error(
                send,
                401,
                "invalid or missing API key; send 'Authorization: Bearer KEY' (or sign in at /login)",
                code="invalid_api_key",
            )
            return
        if _blocked(path):
            await send_error(send, 404, f"{path} is not served here (uploads and file routes are off)")
            return
        if self.api_routes and await self._unknown_api_route(scope, send):
            return
        await self._pass(scope, replay, send)

    async def _pass(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        """Hand the request to the application. When the server stops, it cancels what still runs (the chat
        page's long-lived event streams): those responses are ended properly rather than reported as errors."""
        state = {"started": False, "complete": False}

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.draining:
                raise
            with contextlib.suppress(Exception):
                if not state["started"]:
                    await send_error(send, 503, "the server is shutting down; retry after it restarts")
                elif not state["complete"]:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _is_api(self, path: str) -> bool:
        prefixes = ("/gradio_api", *(self.api_routes[:1] if self.api_routes else ()))
        return any(path == p or path.startswith(p + "/") for p in prefixes)

    async def _read_body(self, scope: dict[str, Any], receive: Callable, send: Callable) -> bytes | None:
        """The whole request body, or ``None`` after answering 413 when it is larger than the limit."""
        limit = self.max_request_bytes
        too_large = (
            f"the request body is larger than this server's limit of {limit:,} bytes; send a smaller request "
            "(or start the server with a larger --max-request-bytes)"
        )
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await send_error(send, 413, too_large, headers=[(b"connection", b"close")])
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""  # the client left: the application sees the disconnect next
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, 413, too_large, headers=[(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _login(self, scope: dict[str, Any], body: bytes, send: Callable) -> None:
        """GET: the form; POST: check the key and set the session cookie."""
        problem = ""
        if scope["method"] == "POST":
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
            key = (form.get("key") or [""])[0].encode("utf-8", "replace")
            if hmac.compare_digest(key, self.api_key or b""):
                cookie = f"{COOKIE}={self.session.decode()}; Path=/; HttpOnly; SameSite=Strict"
                await send(
                    {
                        "type": "http.response.start",
                        "status": 303,
                        "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            problem = '<p class="error">Wrong key. Enter the key the server was started with.</p>'
        page = LOGIN_PAGE.format(title=html.escape(self.title), problem=problem).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401 if problem else 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": page})

    async def _unknown_api_route(self, scope: dict[str, Any], send: Callable) -> bool:
        """Answer 404/405 in OpenAI's shape for a path under the API prefix that no route serves."""
        from starlette.routing import Match

        prefix, routes = self.api_routes or ("", [])
        path = scope["path"]
        if not (path == prefix or path.startswith(prefix + "/")):
            return False
        partial = False
        for route in routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return False
            partial = partial or match == Match.PARTIAL
        if partial:
            await send_error(send, 405, f"{scope['method']} is not allowed on {path}")
        else:
            await send_error(
                send,
                404,
                f"{path} is not served here; see GET {prefix}/models and POST {prefix}/chat/completions",
            )
        return True


def _blocked(path: str) -> bool:
    rest = path[len("/gradio_api") :] if path.startswith("/gradio_api/") else path
    return rest.startswith(BLOCKED_PREFIXES)


def _cookie(header: bytes, name: str) -> bytes | None:
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name.encode():
            return value
    return None


def _replaying(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands the application the body already read, then the client's next messages."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
