"""Hostile input: fuzzed bodies on every endpoint (hypothesis), the limits and their clear
400/413 answers, template text in messages, the API-key check and the default bind address.

Elsewhere: the GGUF reader is fuzzed in tests/test_gguf_errors.py; hostile chat templates
(file access, imports, unbounded loops) are in tests/test_tokenizer.py; "no pickle anywhere"
is in tests/test_layering.py."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import (
    MAX_BODY_MB,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOKENS,
    wait_idle,
)

pytestmark = pytest.mark.model
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# any JSON value, kept small
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) |
    st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                               max_size=4),
    max_leaves=12)
small_ints = st.integers(-3, 40) | st.sampled_from([2**31, 2**63, -2**63 - 1])
texts = st.text(max_size=60) | st.sampled_from(["{{ 7 * 7 }}", "<|im_end|>", "\x00", "\ud7ff"])
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
    optional={"content": texts | json_values}), max_size=3) | json_values
sampling = {
    "max_tokens": small_ints | json_values, "n": small_ints, "temperature": st.floats(),
    "top_p": st.floats(), "top_k": small_ints, "min_p": st.floats(),
    "stop": texts | st.lists(texts, max_size=6) | json_values, "seed": small_ints,
    "logprobs": st.booleans() | small_ints, "top_logprobs": small_ints,
    "logit_bias": st.dictionaries(st.text(max_size=6), st.floats(), max_size=3) | json_values,
    "stop_token_ids": st.lists(small_ints, max_size=3) | json_values,
    "stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "min_tokens": small_ints, "repetition_penalty": st.floats(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "model": st.none() | texts}
prompts = texts | st.lists(small_ints, max_size=8) | st.lists(texts, max_size=3) | json_values
BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries({"messages": messages}, optional=sampling),
    "/v1/completions": st.fixed_dictionaries({"prompt": prompts}, optional=sampling),
    "/tokenize": st.fixed_dictionaries({}, optional={
        "prompt": texts | json_values, "messages": messages,
        "add_special_tokens": st.booleans() | json_values,
        "return_token_strs": st.booleans()}),
    "/detokenize": st.fixed_dictionaries({"tokens": st.lists(small_ints, max_size=8) |
                                          json_values}),
}


def check(r: httpx.Response, t0: float) -> None:
    assert time.monotonic() - t0 < 30, "answered later than 30 s"
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:500])
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event or event["error"]["code"] < 500, event


@pytest.mark.parametrize("path", sorted(BODIES))
def test_fuzzed_bodies_never_5xx(rserver, http, path):
    @FUZZ
    @given(BODIES[path] | json_values)
    def fuzz(b):
        t0 = time.monotonic()
        check(http.post(path, json=b), t0)
    fuzz()
    assert http.get("/health").status_code == 200         # alive after


@FUZZ
@given(raw=st.binary(max_size=200), path=st.sampled_from(sorted(BODIES)),
       ctype=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
def test_fuzzed_raw_bytes_never_5xx(rserver, http, raw, path, ctype):
    t0 = time.monotonic()
    check(http.post(path, content=raw, headers={"content-type": ctype}), t0)


def test_get_endpoints_and_odd_methods(rserver, http):
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("GET", "/v1/completions"), ("DELETE", "/v1/models"),
                         ("PUT", "/tokenize"), ("GET", "/nope"), ("GET", "/v1/../etc/passwd")]:
        t0 = time.monotonic()
        check(http.request(method, path), t0)
    wait_idle(rserver)
    assert http.get("/health").status_code == 200


# -------------------------------------------------------------------------------- limits
def err(r: httpx.Response, status: int, flag: str) -> None:
    assert r.status_code == status, r.text
    assert flag in r.json()["error"]["message"], r.text


def completion(http, **kw):
    return http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **kw})


def test_limits_answer_400_naming_their_flag(http):
    err(completion(http, max_tokens=MAX_TOKENS + 1), 400, "--max-tokens-limit")
    err(completion(http, n=MAX_N + 1), 400, "--max-n")
    err(completion(http, logprobs=MAX_LOGPROBS + 1), 400, "--max-logprobs")
    err(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "logprobs": True,
        "top_logprobs": MAX_LOGPROBS + 1}), 400, "--max-logprobs")
    err(completion(http, stop=[str(i) for i in range(MAX_STOPS + 1)]), 400,
        "--max-stop-strings")
    err(completion(http, stop="x" * (MAX_STOP_CHARS + 1)), 400, "--max-stop-string-chars")
    err(completion(http, prompt=[7] * (MAX_PROMPT_TOKENS + 1)), 400, "--max-prompt-tokens")
    err(completion(http, prompt=["Hi"] * (MAX_PROMPTS + 1)), 400, "--max-prompts")
    assert completion(http, prompt=["Hi"] * MAX_PROMPTS).status_code == 200
    # at the limits: accepted
    r = completion(http, max_tokens=2, n=MAX_N, stop=["x" * MAX_STOP_CHARS] * MAX_STOPS)
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N


def test_default_max_tokens_is_capped_by_the_limit(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Write a long story."}], "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS


def test_body_over_the_limit_is_413(http):
    big = "a" * int(MAX_BODY_MB * (1 << 20))
    err(http.post("/v1/completions", json={"prompt": big}), 413, "byte limit")


def test_template_syntax_in_messages_is_text(http):
    """Message contents are data for the chat template, never template code."""
    r = http.post("/tokenize", json={"messages": [
        {"role": "user", "content": "{{ 7 * 7 }}{% for x in range(10**9) %}{% endfor %}"}]})
    assert r.status_code == 200
    text = http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "{{ 7 * 7 }}" in text and "49" not in text


# ---------------------------------------------------------------------- keys and binding
def test_api_key_is_compared_in_constant_time(monkeypatch):
    """The Gate compares the whole header with hmac.compare_digest, right and wrong keys
    alike (a plain == would leak the matching prefix's length through timing)."""
    import asyncio

    from ostinato.server import transport
    calls = []
    real = transport.hmac.compare_digest
    monkeypatch.setattr(transport.hmac, "compare_digest",
                        lambda a, b: calls.append((a, b)) or real(a, b))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = transport.Gate(app, api_key="s3cret", max_body=100)

    async def status(auth: bytes) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg):
            sent.append(msg)
        scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", auth)]}
        await gate(scope, receive, send)
        return sent[0]["status"]

    for auth, want in [(b"Bearer s3cret", 200), (b"Bearer s3cres", 401), (b"Bearer s", 401),
                       (b"Bearer s3cretX", 401), (b"", 401)]:
        assert asyncio.run(status(auth)) == want
    assert [a for a, _ in calls] == [b"Bearer s3cret", b"Bearer s3cres", b"Bearer s",
                                     b"Bearer s3cretX", b""]


def test_the_server_binds_loopback_by_default():
    import inspect

    from ostinato.cli import build_parser
    from ostinato.server import run_server
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"
