"""HTTP plumbing below the routes: the API-key and body-size gate, server-sent events, and
racing work against the client's disconnect (so a vanished client's request is aborted)."""
from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from starlette.responses import Response

from .protocol import APIError

DISCONNECTED = object()      # until_disconnect's answer when the client went away first


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict:
    """Anthropic's error body, what /v1/messages answers instead of OpenAI's."""
    kind = ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


async def send_error(send, e: APIError, path: str = "") -> None:
    anthropic = path.startswith("/v1/messages")
    body = json.dumps(anthropic_error(e.status, e.message) if anthropic else e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if e.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: 401 without the API key on protected routes; 415 for a compressed
    body (Content-Encoding); 413 for a body over max_body bytes (read here in full, then
    replayed to the app)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected and _protected(scope["path"]) and not self._authorized(scope):
            return await send_error(send, APIError(401, "missing or wrong API key: send "
                                                   "'Authorization: Bearer <key>' or "
                                                   "'x-api-key: <key>'",
                                                   code="invalid_api_key"), scope["path"])
        encoding = dict(scope["headers"]).get(b"content-encoding", b"").strip().lower()
        if encoding not in (b"", b"identity"):
            return await send_error(send, APIError(
                415, f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not supported: "
                "send the request body uncompressed"), scope["path"])
        body = await self._read_body(scope, receive)
        if body is None:
            return await send_error(send, APIError(413, f"the request body is over the "
                                                   f"{self.max_body} byte limit"), scope["path"])
        if body is DISCONNECTED:
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope) -> bool:
        """'Authorization: Bearer <key>', or Anthropic's 'x-api-key: <key>'."""
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        key = headers.get(b"x-api-key")
        if key is not None:
            given = b"Bearer " + key
        return hmac.compare_digest(given, self.expected)      # constant time

    async def _read_body(self, scope, receive):
        """The whole body; None when it is too large, DISCONNECTED if the client left."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return DISCONNECTED
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not msg.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()      # after the body: only http.disconnect will come
    return replay


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive, work: Awaitable):
    """Await `work` unless the client disconnects first; then cancel it (its finally blocks
    abort the engine requests) and return DISCONNECTED."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return DISCONNECTED if task.cancelled() else task.result()


class SSEResponse(Response):
    """text/event-stream from an async iterator of bytes. Unlike Starlette's
    StreamingResponse, it always watches for the disconnect (whatever the server's ASGI
    spec version), so generation stops within one engine step of the client leaving."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None] | None = None,
                 counter=None):
        """on_close runs when the response ends, however (the request's outcome, if nothing
        settled it: the client left); counter.streams counts the open streams."""
        self.events, self.on_close, self.counter = events, on_close, counter
        self.status_code, self.background = 200, None
        if counter is not None:
            counter.streams += 1        # at creation: the limit check and this are one step

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            await until_disconnect(receive, self._pump(send))
        finally:
            if self.counter is not None:
                self.counter.streams -= 1
                self.counter = None
            if self.on_close is not None:
                self.on_close()

    async def _pump(self, send) -> None:
        try:
            async with aclosing(self.events) as events:
                async for chunk in events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:             # the socket is gone (ASGI 2.4 servers say so this way)
            pass
