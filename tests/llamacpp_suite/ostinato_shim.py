"""A pytest plugin that runs llama.cpp's server test suite (tools/server/tests, run in place
from the llama-cpp-python sdist) against `ostinato serve` instead of `llama-server`.

Loaded with `-p ostinato_shim` by scripts/llamacpp_server_suite.py, before the suite's own
conftest. It changes nothing in their files; it patches their utils module:
- ServerProcess.start starts ostinato on a free loopback port with the flags that mean the
  same thing (FLAG_MAP below); a flag with no ostinato equivalent raises LlamaCppOnlyOption,
  so the test is counted as llama.cpp-only, never run against a server that ignores it.
- ServerPreset.load_all (which pre-downloads hub models) does nothing: no network here.
- Every HTTP request the test makes (theirs with `requests`, the openai client's with httpx)
  is recorded with its status and error message, for the classification. The only
  rewrites are pure renames, each noted in the record: the unprefixed OpenAI routes
  (/chat/completions, /models, /responses -> their /v1 routes), and in a /v1/* body
  `model` -> the id we serve (llama-server serves any name) and `n_predict` -> `max_tokens` (and their
  server-wide --n-predict default as `max_tokens` where the body sets none); in a /tokenize
  body `content` -> `prompt` and `add_special` -> `add_special_tokens` (vLLM's names).
- A few flags only choose among things a test rarely looks at (SOFT: --chat-template, the
  reasoning parser): the test runs without them, and the record says so, so a test that
  passes anyway is listed with the flag it ran without.
- A server started with the same flags as the previous test's is reused (llama.cpp starts a
  fresh one per test; at ~3 s a start on two cores that is most of the run); OSTINATO_SUITE_FRESH=1
  restarts it every test instead.
Results go to $OSTINATO_SUITE_RESULTS as JSON lines, one per test.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest

SUITE = Path(os.environ["OSTINATO_SUITE_DIR"]).resolve()
RESULTS = Path(os.environ["OSTINATO_SUITE_RESULTS"])
FRESH = os.environ.get("OSTINATO_SUITE_FRESH") == "1"
HOME = Path(os.environ.get("OSTINATO_HOME", Path.home() / ".cache" / "ostinato"))

sys.path.insert(0, str(SUITE))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: serverproc


class LlamaCppOnlyOption(Exception):
    """The test asks llama-server for a flag (or model) ostinato has no equivalent of. (Not a
    RuntimeError: their tests catch that as "the server failed to start", and would pass.)"""

    def __init__(self, what: str):
        super().__init__(what)
        _log.append({"event": "llamacpp_option", "option": what})


if "wget" not in sys.modules:           # utils imports it only to download test images
    def _no_download(url, out=None):
        raise LlamaCppOnlyOption(f"the test downloads {url}: no network here")
    sys.modules["wget"] = types.SimpleNamespace(download=_no_download)

import utils  # noqa: E402  (their module, from SUITE)

from serverproc import start_server  # noqa: E402

# their preset's hub repo -> our embedded model file; any other model is llama.cpp-only
MODELS = {
    "ggml-org/test-model-stories260K": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "ggml-org/test-model-stories260K-infill": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "ggml-org/stories15M_MOE": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "ggml-org/tinygemma3-GGUF:Q8_0": "gemma-3-270m-q4_k_m.gguf",
    "ggml-org/models/bert-bge-small/ggml-model-f16.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
}

# attributes of their ServerProcess whose default (or given value) asks for nothing that
# ostinato does differently: server-wide sampling defaults (every test that depends on them
# sets them in the request), batch sizes (ours are batch-invariant), always-on features
# (n_predict, their server-wide default max_tokens, has no ostinato flag: the shim puts it
# into a /v1 request that sets no max_tokens, as llama-server applies it)
IGNORED = {"server_port", "temperature", "seed", "offline", "debug", "n_predict",
           "n_batch", "n_ubatch", "n_threads", "n_gpu_layer", "server_continuous_batching",
           "server_embeddings", "server_metrics", "server_slots", "kv_unified", "fa",
           "jinja", "log_path", "n_prompts", "model_hf_repo",
           "model_hf_file", "model_file", "process", "external_server", "cache_prompt",
           "id_slot"}

# attribute -> the values that ask for nothing; any other value is a llama.cpp-only option
BENIGN = {
    "model_url": {None}, "model_draft": {None}, "n_ga": {None}, "n_ga_w": {None},
    "slot_save_path": {None}, "ctk": {None, "f16"}, "ctv": {None, "f16"},
    "server_reranking": {False, None}, "swa_full": {False, None}, "pooling": {None, "last", "mean"},
    "models_dir": {None}, "models_max": {None}, "models_preset": {None},
    "no_models_autoload": {None, False}, "lora_files": {None}, "enable_ctx_shift": {False, None, 0},
    "spec_type": {None}, "spec_draft_n_min": {None}, "spec_draft_n_max": {None},
    "spec_synth_len": {None}, "spec_synth_rates": {None}, 
    "reasoning": {None},
    "server_path": {None}, "mmproj_url": {None}, "no_mmproj": {None, False, True},
    "media_path": {None}, "sleep_idle_seconds": {None}, "cache_ram": {None},
    "no_cache_idle_slots": {False}, "ui_mcp_proxy": {False}, "backend_sampling": {False},
    "gcp_compat": {False}, "server_tools": {None}, "server_tools_runtime": {None},
    "mcp_servers_config": {None}, "mcp_servers_json": {None}, "no_ui": {None, False},
    "model_tags": {None}, "server_host": {"127.0.0.1"},
}
# flags that choose the chat template or the reasoning parser: run without them, noted
SOFT = {"chat_template", "chat_template_file", "reasoning_format"}
MAPPED = {"n_ctx", "n_slots", "api_key", "pooling", "cors_origins", "model_alias"}


def model_file(srv) -> Path:
    repo = srv.model_hf_repo or ""
    key = f"{repo}/{srv.model_hf_file}" if srv.model_hf_file else repo
    if srv.model_file or key not in MODELS:
        raise LlamaCppOnlyOption(f"model {srv.model_file or key or '(none: router mode)'}")
    return HOME / MODELS[key]


def serve_args(srv) -> list[str]:
    """Their ServerProcess attributes as `ostinato serve` flags (after --model)."""
    for name in SOFT:
        if getattr(srv, name, None) not in (None, "none"):
            _log.append({"event": "unhonoured", "option": f"{name}={getattr(srv, name)!r}"})
    for name in set(utils.ServerProcess.__annotations__) - IGNORED - MAPPED - SOFT - set(BENIGN):
        if getattr(srv, name, None) != getattr(utils.ServerProcess, name, None):
            raise LlamaCppOnlyOption(f"llama-server option {name} (unknown to this shim)")
    for name, ok in BENIGN.items():
        value = getattr(srv, name, None)
        if not _in(value, ok):
            raise LlamaCppOnlyOption(f"llama-server option {name}={value!r}")
    if srv.model_alias and "," in srv.model_alias:
        raise LlamaCppOnlyOption(f"several model aliases {srv.model_alias!r}")
    args = ["--kv-cache-gb", "0.25", "--served-model-name", srv.model_alias or "tinyllama-2"]
    if srv.n_ctx:
        args += ["--max-model-len", str(srv.n_ctx)]
    if srv.n_slots:
        args += ["--max-num-seqs", str(srv.n_slots)]
    if srv.api_key:
        args += ["--api-key", srv.api_key]
    if srv.pooling:
        args += ["--pooling", srv.pooling]
    if srv.cors_origins:
        args += ["--allowed-origins", *srv.cors_origins.split(",")]
    return args


def _in(value, ok: set) -> bool:
    try:
        return value in ok
    except TypeError:               # a list is unhashable: only None/False are benign
        return False


# ---------------------------------------------------------------------------------------
# servers: started through tests/serverproc.py, reused while the flags are the same
# ---------------------------------------------------------------------------------------
_pool: dict[tuple, object] = {}        # flags -> a running tests/serverproc Server
_log: list[dict] = []                 # this test's events
_starting = False                     # inside start_server (its polls are not recorded)
_default_max_tokens = None            # their server-wide n_predict, for requests without one


def _start(self, timeout_seconds: int = 180) -> None:
    path = model_file(self)
    key = (str(path), *serve_args(self))
    proc = _pool.get(key)
    if proc is None or proc.proc.poll() is not None:
        _stop_pool()
        global _starting
        _starting = True
        try:
            proc = start_server(path, *key[1:], timeout=timeout_seconds)
        finally:
            _starting = False
        _pool[key] = proc
        _log.append({"event": "start", "args": list(key)})
    else:
        _log.append({"event": "reuse", "args": list(key)})
    self._ostinato = proc
    self.server_port = int(proc.base.rsplit(":", 1)[1])
    self.served_model = key[key.index("--served-model-name") + 1]
    global _default_max_tokens
    _default_max_tokens = self.n_predict if self.n_predict and self.n_predict > 0 else None
    self.ready = True
    utils.server_instances.add(self)


def _stop(self) -> None:
    utils.server_instances.discard(self)
    proc = getattr(self, "_ostinato", None)
    if proc is not None and FRESH:
        _stop_pool()


def _stop_pool() -> None:
    for proc in _pool.values():
        proc.stop()
    _pool.clear()


def _on_sigterm(signum, frame):
    _stop_pool()
    raise SystemExit(128 + signum)


atexit.register(_stop_pool)
signal.signal(signal.SIGTERM, _on_sigterm)      # stopped from outside: stop our servers too
utils.ServerProcess.start = _start
utils.ServerProcess.stop = _stop
utils.ServerPreset.load_all = staticmethod(lambda: None)


# ---------------------------------------------------------------------------------------
# the record of every request, and the two renames
# ---------------------------------------------------------------------------------------
def _current_model() -> str | None:
    for srv in utils.server_instances:
        return getattr(srv, "served_model", None)
    return None


# llama-server answers these OpenAI routes with and without /v1 (its /completions and
# /embeddings without /v1 are its native routes, not OpenAI's: not renamed)
PATHS = {"/chat/completions": "/v1/chat/completions", "/models": "/v1/models",
         "/responses": "/v1/responses"}


def rename_path(url: str) -> tuple[str, list]:
    head, _, path = url.partition("://")[2].partition("/")
    path = "/" + path
    if path in PATHS:
        return url[:len(url) - len(path)] + PATHS[path], [f"path {path}"]
    return url, []


TOKENIZE = {"content": "prompt", "add_special": "add_special_tokens"}


def rename(path: str, body):
    """The pure renames in a JSON body; returns (body, the renames made)."""
    if isinstance(body, dict) and path == "/tokenize":
        done = [k for k in TOKENIZE if k in body]
        return {TOKENIZE.get(k, k): v for k, v in body.items()}, done
    if not isinstance(body, dict) or not path.startswith("/v1/"):
        return body, []
    body, done = dict(body), []
    served = _current_model()
    if "model" in body and served and body["model"] != served:
        body["model"], _ = served, done.append(f"model {body['model']!r}")
    if "n_predict" in body and "max_tokens" not in body:
        body["max_tokens"], _ = body.pop("n_predict"), done.append("n_predict")
    generates = path in ("/v1/chat/completions", "/v1/completions")
    if generates and _default_max_tokens and not {"max_tokens", "max_completion_tokens"} & set(body):
        body["max_tokens"] = _default_max_tokens
        done.append(f"default max_tokens {_default_max_tokens}")
    return body, done


def _record(method: str, url: str, body, status: int, text: str | None, renames: list):
    path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else url
    if _starting:
        return                       # the readiness polls of start_server
    ev = {"event": "request", "method": method, "path": path.split("?")[0], "status": status,
          "fields": sorted(body) if isinstance(body, dict) else None, "renames": renames,
          "request": json.dumps(body)[:2000] if body is not None else None}
    if text is not None:
        ev["error" if status >= 400 else "body"] = text[:1500]
    _log.append(ev)


def _patch_requests():
    import requests
    original = requests.Session.request

    def request(self, method, url, *args, json=None, **kw):
        if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise LlamaCppOnlyOption(f"the test downloads {url}: no network here")
        url, renames = rename_path(url)
        path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else url
        json, more = rename(path, json)
        r = original(self, method, url, *args, json=json, **kw)
        text = r.text if r.status_code >= 400 or not kw.get("stream") else None
        _record(method, url, json, r.status_code, text, renames + more)
        return r
    requests.Session.request = request


def _patch_httpx(httpx):
    """httpx's Client.send (the openai client uses httpx, or its fork httpx2)."""
    original = httpx.Client.send

    def send(self, request, **kw):
        url, renames = rename_path(str(request.url))
        body = None
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(request.read())
            except ValueError:
                body = None
        new, more = rename(httpx.URL(url).path, body)
        if renames or more:
            renames += more
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            content = json.dumps(new).encode() if body is not None else request.read()
            request = httpx.Request(request.method, url, headers=headers, content=content,
                                    extensions=request.extensions)
            body = new
        r = original(self, request, **kw)
        text = None
        if r.status_code >= 400 or not kw.get("stream"):
            r.read()
            text = r.text
        _record(request.method, str(request.url), body, r.status_code, text, renames)
        return r
    httpx.Client.send = send


_patch_requests()
for _name in ("httpx", "httpx2"):
    try:
        _patch_httpx(__import__(_name))
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------
# one JSON line per test
# ---------------------------------------------------------------------------------------
def pytest_deselected(items):
    """Their slow tests (`-m "not slow"`, as their CI runs): recorded, not run."""
    with RESULTS.open("a") as f:
        for item in items:
            f.write(json.dumps({"nodeid": item.nodeid, "outcome": "deselected"}) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _log.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        exc = call.excinfo
        rec = {"nodeid": item.nodeid, "outcome": rep.outcome, "when": rep.when,
               "duration": round(rep.duration, 2),
               "exc_type": exc.typename if exc else None,
               "exc": str(exc.value)[:600] if exc else None,
               "failed_lines": _failed_lines(exc) if rep.failed and exc else None,
               "events": list(_log)}
        if rep.skipped:
            rec["skip"] = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else ""
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _failed_lines(excinfo) -> list[str]:
    """The failing source line of each frame in the suite's files (the test's own, then
    their utils'), e.g. 'unit/test_completion.py: assert match_regex(re_content, ...)'."""
    out = []
    for entry in excinfo.traceback:
        path = Path(str(entry.path))
        if SUITE in path.parents:
            try:
                line = str(entry.statement).strip().replace("\n", " ")
            except Exception:       # no source at hand
                line = "?"
            out.append(f"{path.relative_to(SUITE)}: {line[:300]}")
    return out[-6:]
