"""`ostinato serve`: listen at once, load the model in the background (/health says 503
until it is ready), and exit with the loading error if it fails.

Shutdown (SIGTERM or Ctrl-C): new generations get 503 at once and the listening socket
closes (connection refused); requests in flight get up to `shutdown_timeout` seconds to
finish, then are cut (counted as aborted); then the engine stops and the process exits."""
from __future__ import annotations

import asyncio
import sys
import time

from .app import Limits, build_app


def run_server(model: str, *, served_model_name: str | None = None, host: str = "127.0.0.1",
               port: int = 8000, api_key: str | None = None, limits: Limits | None = None,
               log_level: str = "info", shutdown_timeout: float = 30.0,
               allowed_origins: list[str] | None = None, pooling: str = "last",
               **llm_kwargs) -> None:
    """Serve `model` (an embedded name or a .gguf path) until interrupted. llm_kwargs go to
    LLM(...): threads, max_model_len, max_num_seqs, kv_cache_gb, speculative,
    num_speculative_tokens, draft_model."""
    import uvicorn

    from ..hub import EMBEDDED, model_name, resolve_model
    from ..loader.hf import is_hf_folder
    if model not in EMBEDDED and not is_hf_folder(model):
        resolve_model(model)            # a missing file fails now, not in the background
    draft = llm_kwargs.get("draft_model")
    if draft is not None and draft not in EMBEDDED and not is_hf_folder(draft):
        resolve_model(draft)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None
    _log_to_stderr(log_level)

    def load():
        from ..llm import LLM
        t0 = time.perf_counter()
        llm = LLM(model, **llm_kwargs)
        print(f"loaded {llm.model_name} in {time.perf_counter() - t0:.1f} s; serving at "
              f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
        print(speculative_line(llm), file=sys.stderr, flush=True)
        from ..engine.step_time import target_line
        print(target_line(llm.latency_target, llm.engine.scheduler.max_num_batched_tokens),
              file=sys.stderr, flush=True)
        print(threads_line(llm.engine.governor), file=sys.stderr, flush=True)
        if llm.engine.disk is not None:
            print(disk_tier_line(llm.engine.disk), file=sys.stderr, flush=True)
        print(freeze_startup_heap(), file=sys.stderr, flush=True)
        return llm

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True       # uvicorn polls this flag from its main loop

    app = build_app(load, served_model_name or model_name(model), api_key, limits,
                    on_load_error, allowed_origins, pooling)
    server = _DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                            timeout_graceful_shutdown=shutdown_timeout,
                                            http=_bounded_head_protocol() or "auto"))
    server.run()
    if failure:
        raise failure[0]


def _log_to_stderr(level: str) -> None:
    """The engine's own log lines (thread switches, the disk tier, the draft model) go to
    stderr beside uvicorn's, at the server's --log-level."""
    import logging
    logger = logging.getLogger("ostinato")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def freeze_startup_heap() -> str:
    """Collect once, then move every object alive now (the model's metadata, the tokenizer,
    the web framework: ~215k objects in a server, 271k in a Ray replica) to the garbage
    collector's permanent generation, so that a full collection while serving walks only what
    serving made. Unfrozen, a full collection took 90-135 ms here: a stall for every stream at
    once whenever Python's thresholds call one (rarely: none in 400 requests at 16 streams,
    as they count objects promoted since the last one against a quarter of that heap).
    Returns the startup log line."""
    import gc
    t0 = time.perf_counter()
    gc.collect()
    before = time.perf_counter() - t0
    gc.freeze()
    t0 = time.perf_counter()
    gc.collect()
    after = time.perf_counter() - t0
    return (f"gc: {gc.get_freeze_count()} startup objects frozen; a full collection took "
            f"{before * 1e3:.1f} ms with them, {after * 1e3:.1f} ms now")


def speculative_line(llm) -> str:
    """What speculation is on, for the startup log."""
    spec = getattr(llm, "speculative", None)
    if spec is None:
        return "speculative decoding: off"
    what = spec.method + (f" (draft model {spec.draft_model})" if spec.draft_model else "")
    return f"speculative decoding: {what}, up to {spec.num_speculative_tokens} draft tokens"


def threads_line(governor) -> str:
    import torch
    if governor is None:
        return f"threads: {torch.get_num_threads()}, fixed"
    if not governor.adaptive:
        return f"threads: {governor.current}"
    return (f"threads: {governor.current}, adaptive (each step on the count measured fastest "
            f"now, of {governor.choices}; fewer while another process takes a core)")


def disk_tier_line(disk) -> str:
    return (f"prefix cache disk tier: {disk.dir}, {disk.num_blocks} blocks of this model, "
            f"{disk.num_bytes / 1e9:.2f} of {disk.max_bytes / 1e9:.2f} GB used")


MAX_HEAD_BYTES = 64 << 10   # a request's line and headers (clients send a few KB)
LINGER_S = 1.0              # a refused head's connection: input dropped this long, then closed


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop reading a head over MAX_HEAD_BYTES."""


def _bounded_head_protocol():
    """uvicorn's httptools protocol with a bound on each request's head: it has none (a
    20 MB header was read whole, and a few of 1 GB would end the process). 431 and the
    connection closed past MAX_HEAD_BYTES, counted two ways: exactly, from the parser's URL
    and header callbacks (trailers of a chunked body too); and, while a header is still
    being read (the parser holds it whole before its callback), by the chunks that carry
    neither a body byte nor an end of head or message. None where httptools is not
    installed: uvicorn's h11 protocol bounds the head at 16 KB itself."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class BoundedHead(HttpToolsProtocol):
        _head, _unread, _body, _ends, _refused = 0, 0, 0, 0, False

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return          # the rest of a refused head: read and dropped till the close
            ends, self._body = self._ends, 0
            super().data_received(data)
            if self._ends == ends and not self._body and not self._refused:
                self._unread += len(data)
                if self._unread > MAX_HEAD_BYTES:
                    self._refuse()

        def on_url(self, url: bytes) -> None:
            self._grow(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._grow(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._ends, self._unread = self._ends + 1, 0
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._body, self._unread = self._body + len(body), 0
            super().on_body(body)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._ends, self._head, self._unread = self._ends + 1, 0, 0

        def send_400_response(self, msg: str) -> None:
            if not self._refused:               # a 431 went out already
                super().send_400_response(msg)

        def _grow(self, n: int) -> None:
            self._head += n
            if self._head > MAX_HEAD_BYTES:
                self._refuse()
                raise _HeadTooLarge     # the parser stops: the request is never dispatched

        def _refuse(self) -> None:
            if self._refused:
                return
            self._refused = True
            msg = f"the request line and headers are over {MAX_HEAD_BYTES} bytes".encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: " + str(len(msg)).encode() + b"\r\n"
                                 b"connection: close\r\n\r\n" + msg)
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            # a lingering close: the 431 and a half-close now, the close a second later; a
            # close with the client's bytes unread sends a reset, which can reach the client
            # before it reads the 431
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
    return BoundedHead


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On the first exit signal, refuse new generations (503) before uvicorn stops
        listening: a request that slips in meanwhile is answered, not dropped."""

        def handle_exit(self, sig, frame) -> None:
            self.config.app.state.server.draining = True
            super().handle_exit(sig, frame)
    return DrainingServer


def _DrainingServer(config):
    return _draining_server_class()(config)
