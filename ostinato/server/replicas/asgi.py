"""One HTTP request run through an ASGI app in this process, its response given back as a
stream: first {"status", "headers"}, then the body's chunks (bytes) as the app sends them.
The replica runs its own FastAPI app (build_app) this way, so every route, error and limit
stays the single-process server's. Closing the stream early (the caller went away) is the
client's disconnect: the app sees http.disconnect and aborts the generation."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

log = logging.getLogger("ostinato.replicas")

_running: set[asyncio.Task] = set()     # apps still finishing after their caller left


def http_scope(method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": query, "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


def _finished(task: asyncio.Task) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:      # the app's own handlers
        log.error("the app failed: %r", task.exception())          # answer errors: rare


async def call_app(app, method: str, path: str, query: bytes,
                   headers: list[tuple[bytes, bytes]], body: bytes) -> AsyncIterator:
    """Run the request; yield the response start, then body chunks until the last."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    unread = [body]

    async def receive():
        if unread:
            return {"type": "http.request", "body": unread.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set() and message["type"] == "http.response.body":
            raise OSError("the client went away")     # as an ASGI 2.4 server says so
        await out.put(message)

    async def run():
        try:
            await app(http_scope(method, path, query, headers), receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    _running.add(task)
    task.add_done_callback(_finished)
    try:
        while (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()          # cancelled or closed early: the app sees the disconnect
