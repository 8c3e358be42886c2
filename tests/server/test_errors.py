"""Errors in OpenAI's shape, with the status codes clients act on; the server keeps serving."""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.model
MSGS = [{"role": "user", "content": "Hi"}]


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("field, value, param", [
    ("temperature", -0.5, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("n", 0, "n"),
    ("top_logprobs", 21, "top_logprobs"),
    ("temperature", "hot", "temperature"),
    ("messages", "hello", "messages"),
    ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages"),
    ("max_tokens", 10_000, "messages"),          # prompt + max_tokens beyond the context
    ("stop", 5, "stop"),
    ("logit_bias", {"999999": 5}, "logit_bias"),
])
def test_chat_400(http, server, field, value, param):
    body = {"model": server.model, "messages": MSGS, "max_tokens": 2, field: value}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("field, value, param", [
    ("logprobs", 21, "logprobs"),
    ("prompt", [], "prompt"),
    ("prompt", [10**9], "prompt"),
    ("prompt", "word " * 2000, "prompt"),        # longer than the context
    ("max_tokens", 0, "max_tokens"),             # 0 only to score a prompt (echo)
    ("frequency_penalty", 3.0, "frequency_penalty"),
])
def test_completions_400(http, server, field, value, param):
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 2, field: value}
    assert_error(http.post("/v1/completions", json=body), 400, param)


def test_malformed_json_and_non_object(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', 
                  headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    assert_error(http.post("/v1/completions", json=[1, 2]), 400)


def test_unknown_model_404(client, http):
    r = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSGS})
    assert_error(r, 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)


def test_api_key(server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("POST", "/tokenize"), ("POST", "/detokenize")):
            r = httpx.request(method, server.base + path, headers=headers, json={})
            assert_error(r, 401)
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(server.base + path).status_code == 200
    bad = openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_body_over_the_limit_413(http, server):
    big = "x" * int(server.max_body_mb * (1 << 20) + 10)
    r = http.post("/v1/completions", json={"model": server.model, "prompt": big})
    assert_error(r, 413)


def test_unknown_route_is_openai_shaped(http):
    assert_error(http.get("/v1/nothing"), 404)


def test_server_keeps_serving_after_errors(client, server):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=server.model, messages=MSGS, temperature=-1)
    r = client.chat.completions.create(model=server.model, messages=MSGS, max_tokens=2)
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
     + '{"a": ' * 5000 + "1" + "}" * 5000 + "}}}"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", '
     '"parameters": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}}]}"),
    ("/v1/completions", '{"prompt": "hi", "metadata": ' + '{"a": ' * 3000 + "1"
     + "}" * 3000 + "}"),
    ("/v1/responses", '{"input": ' + "[" * 50000 + "]" * 50000 + "}"),
    ("/v1/messages", '{"max_tokens": 2, "messages": [{"role": "user", "content": '
     + "[" * 20000 + '"x"' + "]" * 20000 + "}]}"),
    ("/tokenize", '{"prompt": "hi", "x": ' + "[" * 3000 + "]" * 3000 + "}"),
])
def test_deeply_nested_bodies_are_400(http, path, body):
    """Nesting past 64 levels (and past Python's recursion limit) is a 400 naming the limit,
    on every route, never a 500."""
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "deeper than 64 levels" in r.text


def test_context_overflow_has_openai_code(http, server):
    """A prompt plus max_tokens over the context is a 400 with OpenAI's error code
    "context_length_exceeded" (clients and agents look for it to trim the conversation)."""
    long = "word " * (server.max_model_len + 50)
    for body in ({"messages": [{"role": "user", "content": long}]},
                 {"messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": server.max_model_len}):
        r = http.post("/v1/chat/completions", json=body)
        err = assert_error(r, 400, "messages")
        assert err["code"] == "context_length_exceeded", err
