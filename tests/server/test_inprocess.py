"""Server behaviour that needs a hand on the inside: a failure injected into one request,
a full waiting queue, loading, and the block pool after aborts. The app runs under uvicorn
on a thread of this process, on a small LLM of its own."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from ostinato.server import Limits, build_app

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def llm(smollm_path):
    from ostinato import LLM
    return LLM(smollm_path, threads=2, max_model_len=256, max_num_seqs=2, kv_cache_gb=0.05)


@contextlib.contextmanager
def serving(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield base
    finally:
        server.should_exit = True
        thread.join(15)


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def explode_on(llm, monkeypatch):
    """Make the output processor raise for sequences whose prompt holds the marker, once
    they have 2 tokens (so a stream has started when it fails)."""
    real = llm.engine.output.append
    marker = "EXPLODE"

    def append(seq, token):
        if marker in llm.tokenizer.decode(seq.prompt_ids) and len(seq.output_ids) >= 2:
            raise RuntimeError("injected detokenizer failure")
        return real(seq, token)
    monkeypatch.setattr(llm.engine.output, "append", append)
    return marker


def test_failure_in_one_request_fails_it_alone(llm, explode_on):
    good = {"prompt": "One, two, three,", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    bad = {"prompt": f"{explode_on} now", "max_tokens": 20, "temperature": 0,
           "ignore_eos": True, "stream": True}
    with serving(build_app(llm, "m")) as base, httpx.Client(base_url=base, timeout=60) as c:
        alone = c.post("/v1/completions", json=good).json()["choices"][0]["text"]
        results = {}
        t = threading.Thread(target=lambda: results.update(
            good=c.post("/v1/completions", json=good).json()))
        t.start()
        raw = c.post("/v1/completions", json=bad).text           # runs beside the good one
        t.join()
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        assert "injected detokenizer failure" in json.loads(events[-2])["error"]["message"]
        assert len(events) >= 3                                   # it had started streaming
        assert results["good"]["choices"][0]["text"] == alone     # untouched by the failure
        r = c.post("/v1/completions", json={**bad, "stream": False})
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        again = c.post("/v1/completions", json=good).json()["choices"][0]["text"]
        assert again == alone                                     # still serving
        assert wait_for(lambda: llm.engine.scheduler.kv.usage() == 0.0)
        llm.engine.scheduler.check_integrity()


def test_full_waiting_queue_is_503(llm):
    app = build_app(llm, "m", limits=Limits(max_queued_requests=1))
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with serving(app) as base, contextlib.ExitStack() as stack:
        c = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        state = app.state.server
        for i in range(3):     # max_num_seqs 2: two run, the third waits
            r = stack.enter_context(c.stream("POST", "/v1/completions", json=body))
            assert r.status_code == 200
            want = min(i + 1, 2)
            assert wait_for(lambda n=want: state.engine.snapshot.running == n)
        assert wait_for(lambda: state.engine.num_waiting() == 1)
        snap = state.engine.snapshot
        r = c.post("/v1/completions", json={**body, "stream": False})
        assert r.status_code == 503, (snap, state.engine.snapshot)
        assert r.json()["error"]["code"] == "queue_full"
    assert wait_for(lambda: llm.engine.scheduler.kv.usage() == 0.0)


def test_health_is_503_while_loading_and_served_name(llm):
    release = threading.Event()

    def load():
        release.wait(30)
        return llm
    with serving(build_app(load, "alias")) as base:
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        assert wait_for(lambda: httpx.get(base + "/health").status_code == 200)
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "alias"
        r = httpx.post(base + "/v1/completions", json={"model": "alias", "prompt": "Hi",
                                                        "max_tokens": 1})
        assert r.status_code == 200


def test_failed_load_reports_the_error():
    errors = []

    def load():
        raise ValueError("no such weights")
    with serving(build_app(load, "m", on_load_error=errors.append)) as base:
        assert wait_for(lambda: errors)
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and "no such weights" in r.json()["error"]


def test_tokenize_defaults_follow_vllm():
    """add_special_tokens: true for a prompt, false for chat messages (the template writes
    BOS itself). SmolLM2 adds no BOS either way, so a stub records what was asked."""
    from ostinato.server.app import _tokenize
    from ostinato.server.protocol import TokenizeRequest

    class Stub:
        max_model_len = 8192

        class tokenizer:
            chat_template = None

            @staticmethod
            def fewest_tokens(text, cap=None):
                return 1

            @staticmethod
            def apply_chat_template(messages, add_generation_prompt, continue_final_message,
                                    variables, tools=None):
                return "rendered"

        @staticmethod
        def tokenize(text, add_special_tokens):
            return [text, add_special_tokens]

    def tok(**body):
        return _tokenize(Stub, TokenizeRequest(**body))
    assert tok(prompt="x") == ["x", True]
    assert tok(prompt="x", add_special_tokens=False) == ["x", False]
    assert tok(messages=[{"role": "user", "content": "x"}]) == ["rendered", False]
    assert tok(messages=[], add_special_tokens=True) == ["rendered", True]
