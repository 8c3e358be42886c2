"""Anthropic's Messages API on the real server (SmolLM2) through the official anthropic
client: a message is its chat completion translated (same greedy text and token counts), the
stream is Anthropic's event order, errors have Anthropic's shape, x-api-key authenticates."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from conftest import API_KEY  # tests/server/conftest.py
pytestmark = pytest.mark.model
# the anthropic client (2.x) has no sampling arguments any more; the API still takes them
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def ac(server):
    return anthropic.Anthropic(base_url=server.base, api_key=API_KEY, max_retries=0,
                               timeout=120)


def _chat(client, server, messages, max_tokens, **more):
    r = client.chat.completions.create(model=server.model, messages=messages,
                                       max_tokens=max_tokens, **GREEDY, **more)
    return r.choices[0], r.usage


def test_create_is_the_chat_completion(ac, client, server):
    m = ac.messages.create(model=server.model, max_tokens=10, extra_body=GREEDY,
                           system="Answer briefly.",
                           messages=[{"role": "user", "content": "Name a fruit."}])
    choice, usage = _chat(client, server, [{"role": "system", "content": "Answer briefly."},
                                           {"role": "user", "content": "Name a fruit."}], 10)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text == choice.message.content
    assert m.usage.output_tokens == usage.completion_tokens
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == usage.prompt_tokens
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[choice.finish_reason]


def test_system_blocks_and_what_clients_always_send(ac, server):
    """cache_control and metadata change nothing: the same greedy text as without them."""
    dressed = ac.messages.create(
        model=server.model, max_tokens=6, extra_body=GREEDY, metadata={"user_id": "u1"},
        system=[{"type": "text", "text": "Be ", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello",
                                                "cache_control": {"type": "ephemeral"}}]}])
    # the blocks are joined with a newline, so compare with that system string too
    joined = ac.messages.create(model=server.model, max_tokens=6, extra_body=GREEDY,
                                system="Be \nbrief.",
                                messages=[{"role": "user", "content": "Hello"}])
    assert dressed.content[0].text == joined.content[0].text
    assert dressed.usage.output_tokens == joined.usage.output_tokens


def test_max_tokens_and_stop_sequence(ac, server):
    kwargs = dict(model=server.model, extra_body=GREEDY,
                  messages=[{"role": "user", "content": "Tell me about the moon."}])
    m = ac.messages.create(max_tokens=12, **kwargs)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 12
    text = m.content[0].text
    word = text.split()[2]              # a word the greedy answer is sure to reach
    cut = ac.messages.create(max_tokens=12, stop_sequences=[word, "zzqx"], **kwargs)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    assert text.startswith(cut.content[0].text) and word not in cut.content[0].text


def test_stream_matches_and_event_order(ac, http, server):
    body = dict(model=server.model, max_tokens=8,
                messages=[{"role": "user", "content": "Say hello."}])
    kwargs = dict(body, extra_body=GREEDY)
    whole = ac.messages.create(**kwargs)
    with ac.messages.stream(**kwargs) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    with http.stream("POST", "/v1/messages", json={**body, **GREEDY, "stream": True},
                     headers={"x-api-key": API_KEY}) as r:
        lines = list(r.iter_lines())
    names = [ln[7:] for ln in lines if ln.startswith("event: ")]
    datas = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    n = names.count("content_block_delta")
    assert names == ["message_start", "ping", "content_block_start"] + \
        ["content_block_delta"] * n + ["content_block_stop", "message_delta", "message_stop"]
    assert all(d["index"] == 0 for d in datas if "index" in d)


def test_count_tokens(ac, server):
    msgs = [{"role": "user", "content": "How many tokens is this?"}]
    n = ac.messages.count_tokens(model=server.model, system="Count.", messages=msgs)
    m = ac.messages.create(model=server.model, max_tokens=1, system="Count.", messages=msgs)
    assert n.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens > 5


def test_tool_blocks_render_as_chat_tool_messages(ac, http, server):
    """tool_use / tool_result history is the chat conversation with tool_calls and a tool
    message: the same tokens as /tokenize renders for it."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22 C"},
                {"type": "text", "text": "Thanks"}]}]
    n = ac.messages.count_tokens(model=server.model, messages=msgs).input_tokens
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {
                    "name": "weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "22 C"},
            {"role": "user", "content": "Thanks"}]
    assert n == http.post("/tokenize", json={"messages": chat}).json()["count"]


def test_tools_follow_the_chat_path(ac, server):
    tool = {"name": "get_weather", "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]}}
    kwargs = dict(model=server.model, max_tokens=40, tools=[tool], extra_body=GREEDY,
                  tool_choice={"type": "any", "disable_parallel_tool_use": True},
                  messages=[{"role": "user", "content": "Weather in Paris?"}])
    m = ac.messages.create(**kwargs)
    use = next(b for b in m.content if b.type == "tool_use")
    assert m.stop_reason == "tool_use" and use.name == "get_weather" and "city" in use.input


def test_auth(server):
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    for headers, status in [({"x-api-key": API_KEY}, 200),
                            ({"Authorization": f"Bearer {API_KEY}"}, 200),
                            ({"x-api-key": "wrong"}, 401), ({}, 401)]:
        r = httpx.post(server.base + "/v1/messages", json=body, headers=headers, timeout=60)
        assert r.status_code == status, (headers, r.text)
        if status == 401:
            assert r.json()["type"] == "error"
            assert r.json()["error"]["type"] == "authentication_error"
    bad = anthropic.Anthropic(base_url=server.base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=server.model, max_tokens=1,
                            messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("body, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "foo": 1}, "foo"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "temperature": 1.5}, "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AA=="}}]}]}, "image"),
    ({"max_tokens": 4, "messages": [{"role": "tool", "content": "hi"}]}, "role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "22 C"}]}]}, "tool_use_id"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "assistant message"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}]}, "context"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "model": "claude-nonexistent"}, "claude-nonexistent"),
])
def test_errors_have_anthropic_shape(http, body, needle):
    r = http.post("/v1/messages", json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()
    assert err["type"] == "error" and needle in err["error"]["message"], err
    assert err["error"]["type"] == ("not_found_error" if r.status_code == 404
                                    else "invalid_request_error")


# --------------------------------------------------------------- thinking (no model needed)
def _chunks(*deltas, finish="stop"):
    async def gen():
        for d in deltas:
            yield ("data: " + json.dumps({"choices": [{"delta": d, "finish_reason": None}]})
                   + "\n\n").encode()
        yield ("data: " + json.dumps({"choices": [{"delta": {}, "finish_reason": finish}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
               + "\n\n").encode()
    return gen()


def _events(stream) -> list[dict]:
    import asyncio

    async def run():
        return [json.loads(b.decode().split("data: ", 1)[1]) async for b in stream]
    return asyncio.run(run())


def test_thought_streams_as_a_thinking_block_before_text():
    from ostinato.server.anthropic import EventStream, MessagesRequest, signature
    req = MessagesRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    ev = _events(EventStream(req, "m", 3).run(_chunks(
        {"reasoning_content": "sky "}, {"reasoning_content": "is blue"}, {"content": "Yes."})))
    kinds = [(e["type"], (e.get("delta") or e.get("content_block") or {}).get("type"))
             for e in ev]
    assert kinds[2:] == [("content_block_start", "thinking"),
                         ("content_block_delta", "thinking_delta"),
                         ("content_block_delta", "thinking_delta"),
                         ("content_block_delta", "signature_delta"),
                         ("content_block_stop", None),
                         ("content_block_start", "text"), ("content_block_delta", "text_delta"),
                         ("content_block_stop", None), ("message_delta", None),
                         ("message_stop", None)]
    assert ev[5]["delta"]["signature"] == signature("sky is blue") and ev[8]["index"] == 1


def test_thinking_options_and_history():
    from ostinato.server.anthropic import MessagesRequest, to_chat
    from ostinato.server.protocol import APIError
    turn = {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature":
                                              "x"}, {"type": "text", "text": "a"}]}
    msgs = [{"role": "user", "content": "q"}, turn, {"role": "user", "content": "q2"}, turn,
            {"role": "system", "content": "mid"}, {"role": "user", "content": "q3"}]

    def chat(**kw):
        req = MessagesRequest(messages=msgs, max_tokens=5, **kw)
        req.check(template_thinks=True)
        return to_chat(req).messages

    kept = [m.get("reasoning_content") for m in chat() if m["role"] == "assistant"]
    assert kept == ["t", "t"]
    cleared = chat(context_management={"edits": [{"type": "clear_thinking_20251015"}]})
    assert [m.get("reasoning_content") for m in cleared if m["role"] == "assistant"] == \
        [None, "t"]
    assert cleared[4] == {"role": "system", "content": "mid"}
    assert chat(thinking={"type": "disabled"}) and MessagesRequest(
        messages=msgs, max_tokens=5, thinking={"type": "disabled"}).template_kwargs() == \
        {"enable_thinking": False}
    chat(thinking={"type": "adaptive"}, output_config={"effort": "high"})
    for bad in ({"thinking": {"type": "enabled", "budget_tokens": 1024}},
                {"output_config": {"effort": "low"}},
                {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}):
        with pytest.raises(APIError) as e:
            chat(**bad)
        assert e.value.param == next(iter(bad)), bad


def test_tool_use_ids_have_anthropics_form():
    """tool_use ids are toolu_... (SGLang's Anthropic tests check the prefix), the same id in
    a message and in a stream, and a client's own id sent back passes through unchanged."""
    from ostinato.server.anthropic import EventStream, MessagesRequest, message_of, to_chat
    req = MessagesRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "f", "arguments": '{"x": 1}'}}
    m = message_of({"choices": [{"message": {"content": None, "tool_calls": [call]},
                                 "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, req, "m")
    assert m["content"] == [{"type": "tool_use", "id": "toolu_abc", "name": "f",
                             "input": {"x": 1}}]
    ev = _events(EventStream(req, "m", 3).run(_chunks(
        {"tool_calls": [{"index": 0, **call}]}, finish="tool_calls")))
    start = next(e for e in ev if e["type"] == "content_block_start")
    assert start["content_block"]["id"] == "toolu_abc"
    back = MessagesRequest(max_tokens=9, messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": m["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_abc",
                                      "content": "ok"}]}])
    msgs = to_chat(back).messages
    assert msgs[1]["tool_calls"][0]["id"] == "toolu_abc"
    assert msgs[2] == {"role": "tool", "tool_call_id": "toolu_abc", "content": "ok"}
