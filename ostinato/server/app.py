"""The OpenAI-compatible HTTP API: `build_app(llm, ...)` returns a FastAPI (ASGI) app.

    app = build_app(LLM("smollm2-135m-instruct"))            # or a loader: build_app(load, "name")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models,
GET /v1/models/{id}, POST /v1/responses (+ GET/DELETE /v1/responses/{id}, POST .../cancel),
POST /v1/messages, POST /v1/messages/count_tokens (Anthropic), POST /tokenize,
POST /detokenize, GET /tokenizer_info, GET /health (503 while loading), GET /metrics, GET /
(the chat page, static/).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEngine
from ..tokenizer import ChatTemplateError
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    Limits,
    TokenizeRequest,
    bad_request,
    check_limits,
    parse_request,
)
from .anthropic import add_anthropic_routes
from .embeddings import embed, embedding_inputs, embedding_response
from .responses import add_responses_routes
from .serving import Generation, chat_job, completion_job, error_body, render_chat
from .transport import DISCONNECTED, Gate, SSEResponse, until_disconnect

log = logging.getLogger("ostinato.server")
FAULT_ENV = "OSTINATO_FAULT_INJECT"     # test hook: see AsyncEngine.enable_fault_injection


class ServerState:
    """The model and its engine thread, present once loaded (loading may run in the
    background so /health can answer 503 meanwhile)."""

    def __init__(self, source, name: str, metrics: ServerMetrics, limits: Limits,
                 on_load_error: Callable[[BaseException], None] | None, pooling: str):
        self.source, self.name, self.metrics, self.limits = source, name, metrics, limits
        self.on_load_error, self.pooling = on_load_error, pooling
        self.fingerprint: str | None = None     # system_fingerprint, set before readiness
        self.llm = self.engine = None
        self.error: BaseException | None = None
        self.created = int(time.time())
        self.draining = False           # set on SIGTERM: new generations get 503
        self.streams = 0                # open SSE responses (event loop only)
        # read once, at startup: no request can turn the hook on
        self.fault_marker = os.environ.get(FAULT_ENV) or None

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
        self.fingerprint = llm.fingerprint()
        self.metrics.slow_paths.set(len(getattr(llm, "slow_paths", ())))   # logged at load
        kv = getattr(llm.engine.scheduler, "kv", None)
        if kv is not None:          # before the engine thread starts: nothing else reads it
            self.metrics.cache_config(kv.block_size, sum(p.num_blocks - 1 for p in kv.pools))
        engine = AsyncEngine(llm.engine, on_step=self.metrics.on_step)
        if self.fault_marker:
            log.warning("%s is set: requests containing %r fail on purpose (test hook)",
                        FAULT_ENV, self.fault_marker)
            engine.enable_fault_injection()
        engine.start()
        self.llm, self.engine = llm, engine         # engine last: it marks readiness

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def require(self):
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
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
              on_load_error: Callable[[BaseException], None] | None = None,
              allowed_origins: list[str] | None = None, pooling: str = "last") -> FastAPI:
    """llm: an LLM, or a zero-argument callable returning one (loaded in the background at
    startup; then served_model_name is required). allowed_origins: web origins that may
    call the API from a browser (CORS; "*" for any; none by default). pooling: how
    /v1/embeddings pools the final hidden states, "last" (default) or "mean"."""
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', not {pooling!r}")
    if served_model_name is None:
        if callable(llm):
            raise ValueError("build_app: give served_model_name when llm is a loader")
        served_model_name = llm.model_name
    limits = limits or Limits()
    state = ServerState(llm, served_model_name, ServerMetrics(served_model_name), limits,
                        on_load_error, pooling)

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
    add_responses_routes(app, state, admit, run_generation)
    add_anthropic_routes(app, state, admit, run_generation)
    app.add_middleware(Gate, api_key=api_key, max_body=limits.max_body_bytes)
    if allowed_origins:     # outside the Gate: preflights carry no key, and 401s need CORS
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key",
                                          "anthropic-version"], max_age=600)
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
        message = str(e.detail)
        if e.status_code == 404:
            message = f"there is no route {request.url.path}"
        elif e.status_code == 405:
            message = (f"{request.method} is not allowed on {request.url.path}; use "
                       f"{(e.headers or {}).get('Allow', 'another method')}")
        return JSONResponse(APIError(e.status_code, message).body(), e.status_code,
                            headers=e.headers)

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
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": state.name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        llm, _ = state.require()
        return {"object": "list", "data": [_model_card(state, llm)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        llm, _ = state.require()
        state.check_model(model_id)
        return _model_card(state, llm)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        # the chat page (static/); the CSP forbids inline script and any other origin.
        # HEAD too: clients probe the base URL so before their first request (Claude Code)
        return FileResponse(_STATIC / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")


def _model_card(state: ServerState, llm) -> dict:
    return {"id": state.name, "object": "model", "created": state.created,
            "owned_by": "ostinato", "root": str(llm.model_path),
            "max_model_len": llm.max_model_len,
            "embedding_dimensions": llm.config.d_model, "pooling": state.pooling,
            "system_fingerprint": state.fingerprint}


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_request(await request.body(), TokenizeRequest)
        llm, _ = state.require()
        state.check_model(req.model)
        return Response(await asyncio.to_thread(_tokenize_answer, llm, req),
                        media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse_request(await request.body(), DetokenizeRequest)
        llm, _ = state.require()
        state.check_model(req.model)
        return {"prompt": await asyncio.to_thread(_detokenize, llm, req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        llm, _ = state.require()
        return _tokenizer_info(llm)


def _tokenizer_info(llm) -> dict:
    """vLLM's /tokenizer_info, what lm-eval's remote tokenizer reads (eos, bos, pad, chat
    template) so it needs no tokenizer from a model hub."""
    tok = llm.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    return {"tokenizer_class": f"ostinato.Tokenizer({tok.model})",
            "bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None,
            "pad_token": tok.id_to_piece(pad) if pad is not None else None,
            "chat_template": tok.chat_template, "model_max_length": llm.max_model_len,
            "vocab_size": llm.config.vocab_size}


def _tokenize_answer(llm, req: TokenizeRequest) -> bytes:
    """The whole answer, encoded off the event loop (millions of ids and their texts take
    seconds to list and encode)."""
    ids = _tokenize(llm, req)
    out = {"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [llm.tokenizer.id_to_piece(t) for t in ids]
    return json.dumps(out, ensure_ascii=False).encode()


TOKENIZE_CONTEXTS = 16      # /tokenize counts a text of up to this many contexts' tokens


def _tokenize(llm, req: TokenizeRequest) -> list[int]:
    """vLLM's rules: a prompt gets special tokens (BOS) by default; messages are rendered
    with the chat template, which writes its own, so they get none by default. A text longer
    than the context is counted, not refused (as vLLM), up to _check_countable's bound."""
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.prompt is not None:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        _check_countable(llm, req.prompt, "prompt")
        return llm.tokenize(req.prompt, add_special_tokens=special)
    text = render_chat(llm, req, req.tool_plan(llm.tokenizer.chat_template),
                       TOKENIZE_CONTEXTS * llm.max_model_len)
    _check_countable(llm, text, "messages")
    return llm.tokenize(text, add_special_tokens=bool(req.add_special_tokens))


def _check_countable(llm, text: str, param: str) -> None:
    """400 for a text of surely more than TOKENIZE_CONTEXTS contexts' tokens
    (Tokenizer.fewest_tokens): counting a 4 MB word would take this tokenizer ~45 s."""
    cap = TOKENIZE_CONTEXTS * llm.max_model_len
    fewest = llm.tokenizer.fewest_tokens(text, cap)
    if fewest > cap:
        raise bad_request(f"{param} has at least {fewest} tokens; /tokenize counts up to {cap}"
                          f" ({TOKENIZE_CONTEXTS} times the model's context)", param)


def _detokenize(llm, ids: list[int]) -> str:
    """Off the event loop: millions of ids (a body's worth) take seconds."""
    vocab = llm.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is not in [0, {vocab})", "tokens")
    return llm.detokenize(ids)


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, state, ChatCompletionRequest, chat_job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, state, CompletionRequest, completion_job)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await _embeddings(request, state)


async def _embeddings(request: Request, state: ServerState):
    req = await parse_request(await request.body(), EmbeddingRequest)
    llm, engine = state.require()
    state.check_model(req.model)
    ids = await asyncio.to_thread(embedding_inputs, llm, req, state.limits)
    if engine.num_waiting() + len(ids) > state.limits.max_queued_requests:
        raise APIError(503, f"the server is busy: {engine.num_waiting()} requests are waiting "
                       "(--max-queued-requests); retry later", code="queue_full")
    outcome = state.metrics.accept()
    vectors = await _settled(request, outcome, embed(engine, ids, state.pooling),
                             "embeddings request")
    if isinstance(vectors, Response):
        return vectors
    return JSONResponse(embedding_response(vectors, ids, state.name, req.encoding_format))


async def _generate(request: Request, state: ServerState, model, make_job):
    raw = await request.body()
    gen = await admit(state, raw, await parse_request(raw, model), make_job)
    return await run_generation(request, state, gen)


async def admit(state: ServerState, raw: bytes, req, make_job=chat_job) -> Generation:
    """A parsed request, checked against the limits and queued as a Generation (not yet
    started); /v1/responses and /v1/messages translate onto chat requests and come here."""
    llm, engine = state.require()
    state.check_model(req.model)
    limits = state.limits
    check_limits(req, limits)
    # tokenizing and template rendering can take a while for long prompts: off the loop
    job = await asyncio.to_thread(make_job, llm, req, state.name, limits)
    job.fingerprint = state.fingerprint
    if engine.num_waiting() + len(job.prompts) > limits.max_queued_requests:
        raise APIError(503, f"the server is busy: {engine.num_waiting()} requests are waiting "
                       "(--max-queued-requests); retry later", code="queue_full")
    if job.stream and state.streams >= limits.max_concurrent_streams:
        raise APIError(503, f"the server has {state.streams} streams open "
                       "(--max-concurrent-streams); retry later", code="too_many_streams")
    # accepted from here on: exactly one outcome is settled, whatever happens
    outcome = state.metrics.accept()
    fault = state.fault_marker is not None and state.fault_marker.encode() in raw
    return Generation(job, engine, state.metrics, llm.tokenizer, outcome, fault)


async def run_generation(request: Request, state: ServerState, gen: Generation,
                         on_stream=None, on_result=None):
    """The SSE stream (through on_stream, which turns chat chunks' SSE bytes into another
    API's events) or the JSON (through on_result, dict -> dict); an error's body is
    OpenAI's, and a disconnect aborts the generation either way."""
    outcome = gen.outcome
    if gen.job.stream:
        events = on_stream(gen.stream()) if on_stream else gen.stream()
        return SSEResponse(events, on_close=lambda: outcome.settle("aborted"), counter=state)
    result = await _settled(request, outcome, gen.collect(), f"request {gen.job.id}")
    if isinstance(result, Response):
        return result
    return JSONResponse(on_result(result) if on_result else result)


async def _settled(request: Request, outcome, work, what: str):
    """Await `work` unless the client disconnects first, settling exactly one outcome: the
    result, or the Response to send instead (the error's, or a 499 nobody reads)."""
    try:
        result = await until_disconnect(request.receive, work)
    except Exception as e:                    # this request failed; the server goes on
        log.exception("%s failed", what)
        outcome.settle("error")
        body = error_body(e)
        return JSONResponse(body, status_code=body["error"]["code"])
    except BaseException:                     # cancelled (shutdown timeout): still settled
        outcome.settle("aborted")
        raise
    if result is DISCONNECTED:
        outcome.settle("aborted")
        return Response(status_code=499)      # the requests were aborted
    outcome.settle("completed")
    return result


_STATIC = Path(__file__).parent / "static"
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
