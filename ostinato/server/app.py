"""The OpenAI-compatible HTTP API: `build_app(llm, ...)` returns a FastAPI (ASGI) app.

    app = build_app(LLM("smollm2-135m-instruct"))            # or a loader: build_app(load, "name")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /health (503 while loading), GET /metrics, GET / (a short page).
"""
from __future__ import annotations

import asyncio
import html
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEngine
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    parse_body,
)
from .serving import Generation, chat_job, completion_job, error_body
from .transport import DISCONNECTED, Gate, SSEResponse, until_disconnect

log = logging.getLogger("ostinato.server")


@dataclass
class Limits:
    max_queued_requests: int = 256      # prompts waiting to start; beyond: 503
    max_body_bytes: int = 16 << 20


class ServerState:
    """The model and its engine thread, present once loaded (loading may run in the
    background so /health can answer 503 meanwhile)."""

    def __init__(self, source, name: str, metrics: ServerMetrics, limits: Limits,
                 on_load_error: Callable[[BaseException], None] | None):
        self.source, self.name, self.metrics, self.limits = source, name, metrics, limits
        self.on_load_error = on_load_error
        self.llm = self.engine = None
        self.error: BaseException | None = None
        self.created = int(time.time())

    def start(self) -> None:
        if callable(self.source):
            threading.Thread(target=self._load, name="ostinato-load", daemon=True).start()
        else:
            self._ready(self.source)

    def _load(self) -> None:
        try:
            self._ready(self.source())
        except BaseException as e:
            self.error = e
            if self.on_load_error:
                self.on_load_error(e)       # it reports the error (the CLI exits with it)
            else:
                log.error("loading the model failed: %s", e)

    def _ready(self, llm) -> None:
        engine = AsyncEngine(llm.engine, on_step=self.metrics.on_step)
        engine.start()
        self.llm, self.engine = llm, engine         # engine last: it marks readiness

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def require(self):
        if self.engine is not None and self.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.error}")
        if self.engine is None:
            why = f"the model failed to load: {self.error}" if self.error else \
                "the model is still loading"
            raise APIError(503, why)
        return self.llm, self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.name!r}", "model", "model_not_found")


def build_app(llm, served_model_name: str | None = None, api_key: str | None = None,
              limits: Limits | None = None,
              on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """llm: an LLM, or a zero-argument callable returning one (loaded in the background at
    startup; then served_model_name is required)."""
    if served_model_name is None:
        if callable(llm):
            raise ValueError("build_app: give served_model_name when llm is a loader")
        served_model_name = llm.model_name
    limits = limits or Limits()
    state = ServerState(llm, served_model_name, ServerMetrics(served_model_name), limits,
                        on_load_error)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        yield
        state.stop()

    app = FastAPI(title="Ostinato", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_token_routes(app, state)
    _add_generation_routes(app, state)
    app.add_middleware(Gate, api_key=api_key, max_body=limits.max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(bad_request(str(e.errors()[0].get("msg", e))).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("request failed")
        body = error_body(e)
        return JSONResponse(body, status_code=body["error"]["code"])


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        error = state.error or (state.engine and state.engine.error)
        if error:
            return JSONResponse({"status": "error", "error": str(error)}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": state.name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        llm, _ = state.require()
        return {"object": "list", "data": [{
            "id": state.name, "object": "model", "created": state.created,
            "owned_by": "ostinato", "root": str(llm.model_path),
            "max_model_len": llm.max_model_len}]}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return _INDEX.format(name=html.escape(state.name),
                             status="ready" if state.engine else "loading")


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse_body(await request.body(), TokenizeRequest)
        llm, _ = state.require()
        state.check_model(req.model)
        ids = await asyncio.to_thread(_tokenize, llm, req)
        out = {"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [llm.tokenizer.id_to_piece(t) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse_body(await request.body(), DetokenizeRequest)
        llm, _ = state.require()
        state.check_model(req.model)
        vocab = llm.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is not in [0, {vocab})", "tokens")
        return {"prompt": llm.detokenize(req.tokens)}


def _tokenize(llm, req: TokenizeRequest) -> list[int]:
    """vLLM's rules: a prompt gets special tokens (BOS) by default; messages are rendered
    with the chat template, which writes its own, so they get none by default."""
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.prompt is not None:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        return llm.tokenize(req.prompt, add_special_tokens=special)
    try:
        text = llm.tokenizer.apply_chat_template(req.messages, req.add_generation_prompt)
    except Exception as e:
        raise bad_request(f"messages: {e}", "messages") from None
    return llm.tokenize(text, add_special_tokens=bool(req.add_special_tokens))


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, state, ChatCompletionRequest, chat_job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, state, CompletionRequest, completion_job)


async def _generate(request: Request, state: ServerState, model, make_job):
    req = parse_body(await request.body(), model)
    llm, engine = state.require()
    state.check_model(req.model)
    # tokenizing and template rendering can take a while for long prompts: off the loop
    job = await asyncio.to_thread(make_job, llm, req, state.name)
    if engine.num_waiting() + len(job.prompts) > state.limits.max_queued_requests:
        raise APIError(503, f"the server is busy: {engine.num_waiting()} requests are waiting "
                       "(--max-queued-requests); retry later", code="queue_full")
    gen = Generation(job, engine, state.metrics, llm.tokenizer)
    if job.stream:
        return SSEResponse(gen.stream())
    try:
        result = await until_disconnect(request.receive, gen.collect())
    except Exception as e:                    # this request failed; the server goes on
        log.exception("request %s failed", job.id)
        body = error_body(e)
        return JSONResponse(body, status_code=body["error"]["code"])
    if result is DISCONNECTED:
        return Response(status_code=499)      # nobody reads it; the requests were aborted
    return JSONResponse(result)


_INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>Ostinato</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 2em auto">
<h1>Ostinato</h1><p>Serving <code>{name}</code> ({status}) with an OpenAI-compatible API.</p>
<ul><li><code>POST /v1/chat/completions</code></li><li><code>POST /v1/completions</code></li>
<li><code>GET /v1/models</code></li><li><code>POST /tokenize</code>,
<code>POST /detokenize</code></li><li><code>GET /health</code>, <code>GET /metrics</code></li></ul>
<pre>curl http://HOST:PORT/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'</pre>
</body></html>"""
