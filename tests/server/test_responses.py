"""OpenAI's Responses API on the real server (SmolLM2) through the official openai client:
a response is its chat completion translated (same greedy text, same token counts), its stream
is the documented event sequence, previous_response_id continues a stored conversation."""
from __future__ import annotations

import json
import threading
import time

import jsonschema
import openai
import pytest

from ostinato.server.responses import ResponseStore, Stored

pytestmark = pytest.mark.model

GREEDY = {"temperature": 0.0}


def _chat_text(client, server, messages, max_tokens):
    r = client.chat.completions.create(model=server.model, messages=messages,
                                       max_tokens=max_tokens, temperature=0.0)
    return r.choices[0].message.content, r.usage


def test_create_is_the_chat_completion(client, server):
    r = client.responses.create(model=server.model, input="Name a colour.",
                                instructions="Answer in one word.", max_output_tokens=12,
                                **GREEDY)
    text, usage = _chat_text(client, server, [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour."}], 12)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == text and text
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.input_tokens == usage.prompt_tokens
    assert r.usage.output_tokens == usage.completion_tokens
    assert r.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert r.status == ("incomplete" if usage.completion_tokens == 12 else "completed")


def test_max_output_tokens_gives_incomplete(client, server):
    r = client.responses.create(model=server.model, input="Tell me a long story.",
                                max_output_tokens=3, **GREEDY)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[-1].status == "incomplete"


def test_item_list_input(client, server):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "Hi, "},
                          {"type": "input_text", "text": "who are you?"}]}]
    r = client.responses.create(model=server.model, input=items, max_output_tokens=8, **GREEDY)
    text, _ = _chat_text(client, server, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi, who are you?"}], 8)
    assert r.output_text == text


def test_stream_event_sequence(client, server):
    kwargs = dict(model=server.model, input="Say hello.", max_output_tokens=10, **GREEDY)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    n = kinds.count("response.output_text.delta")
    assert n >= 1
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * n + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-4].text == text and events[-2].item.content[0].text == text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"


def test_previous_response_id_continues(client, server):
    first = client.responses.create(model=server.model, input="My name is Ada.",
                                    instructions="Be brief.", max_output_tokens=6, **GREEDY)
    second = client.responses.create(model=server.model, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=6,
                                     **GREEDY)
    # instructions are not carried over (OpenAI's rule); input and output are
    text, usage = _chat_text(client, server, [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}], 6)
    assert second.output_text == text
    assert second.usage.input_tokens == usage.prompt_tokens
    assert second.previous_response_id == first.id
    got = client.responses.retrieve(second.id)
    assert got.output_text == second.output_text and got.id == second.id


def test_stream_is_stored(client, server):
    events = list(client.responses.create(model=server.model, input="Hi", stream=True,
                                          max_output_tokens=4, **GREEDY))
    final = events[-1].response
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_store_false_and_delete(client, server, http):
    r = client.responses.create(model=server.model, input="Hi", store=False,
                                max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    kept = client.responses.create(model=server.model, input="Hi", max_output_tokens=2)
    assert http.delete(f"/v1/responses/{kept.id}").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=server.model, input="Hi", previous_response_id="resp_x")


def test_json_schema_format(client, server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(
        model=server.model, input="Make up a person.", max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                         "strict": True}}, **GREEDY)
    jsonschema.validate(json.loads(r.output_text), schema)


def test_cancel_stops_a_stream(client, server, http):
    """Cancel while streaming: the stream ends early, status cancelled."""
    with http.stream("POST", "/v1/responses", json={
            "model": server.model, "input": "Write a very long story about the sea.",
            "max_output_tokens": 400, "stream": True, "temperature": 0.0}) as resp:
        lines = resp.iter_lines()
        rid, deltas = None, 0
        for line in lines:
            if line.startswith("data: "):
                e = json.loads(line[6:])
                rid = rid or e["response"]["id"]
                if e["type"] == "response.output_text.delta":
                    break
        assert http.post(f"/v1/responses/{rid}/cancel").json()["status"] == "cancelled"
        last = None
        for line in lines:
            if line.startswith("data: "):
                last = json.loads(line[6:])
                deltas += last["type"] == "response.output_text.delta"
    assert last["response"]["status"] == "cancelled" and deltas < 100
    assert http.get(f"/v1/responses/{rid}").json()["status"] == "cancelled"
    # a finished response cannot be cancelled
    assert http.post(f"/v1/responses/{rid}/cancel").status_code == 400


def test_function_tools_follow_the_chat_path(client, server):
    tool = {"type": "function", "name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}
    # one call: SmolLM2 (135M) would go on repeating calls until max_output_tokens
    r = client.responses.create(model=server.model, input="Weather in Paris?", tools=[tool],
                                tool_choice="required", parallel_tool_calls=False,
                                temperature=0, max_output_tokens=40)
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)


def test_follow_ups_do_not_change_the_stored_conversation(client, server):
    # a follow-up's function_call items joined the stored response's own assistant turn by
    # appending to its list: every later follow-up of it saw their calls (107 -> 602 tokens)
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    first = client.responses.create(model=server.model, input="Call f.", tools=[tool],
                                    tool_choice="required", parallel_tool_calls=False,
                                    temperature=0, max_output_tokens=40)
    call = next(o for o in first.output if o.type == "function_call")
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "ok"}

    def follow_up(extra: list) -> int:
        r = client.responses.create(model=server.model, previous_response_id=first.id,
                                    input=[*extra, answer], store=False, max_output_tokens=1)
        return r.usage.input_tokens

    before = follow_up([])
    other = {"type": "function_call", "call_id": "x1", "name": "f", "arguments": "{}"}
    assert follow_up([other, {**answer, "call_id": "x1"}]) > before
    assert follow_up([]) == before


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "hi", "reasoning": {"summary": "detailed"}}, "reasoning"),
    ({"input": "hi", "tools": [{"type": "namespace", "name": "n", "tools": []}]}, "tools"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"type": "web_search_call"}]}, "input"),
    ({"input": "hi", "text": {"format": {"type": "grammar"}}}, "text"),
    ({"input": "hi", "text": {"verbosity": "low"}}, "text"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 5000}, "input"),     # over the context
    ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "hi", "model": "gpt-nonexistent"}, "model"),
])
def test_refused_naming_the_field(http, body, param):
    r = http.post("/v1/responses", json=body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param, err


def test_store_bounds():
    store = ResponseStore(max_count=3, max_age_s=0.2)
    for i in range(5):
        store.put(f"r{i}", Stored({"id": f"r{i}"}, []))
    assert list(store.items) == ["r2", "r3", "r4"]
    time.sleep(0.25)
    store.put("r5", Stored({"id": "r5"}, []))
    assert store.get("r5").response["id"] == "r5" and list(store.items) == ["r5"]


def test_disconnect_aborts(server, http):
    """A client that leaves mid-stream frees its engine request (running goes back to 0)."""
    def leave():
        with http.stream("POST", "/v1/responses", json={
                "input": "Count to a thousand.", "max_output_tokens": 400,
                "stream": True}) as resp:
            for line in resp.iter_lines():
                if "output_text.delta" in line:
                    return
    t = threading.Thread(target=leave)
    t.start()
    t.join(60)
    deadline = time.time() + 10
    while time.time() < deadline:
        running = [ln for ln in http.get("/metrics").text.splitlines()
                   if ln.startswith("ostinato:num_requests_running")]
        if running and float(running[0].split()[-1]) == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"the engine request was not aborted: {running}")


# --------------------------------------------------------------- reasoning (no model needed)
def test_thought_streams_as_a_reasoning_item_before_the_message():
    import asyncio

    from ostinato.server.responses import EventStream, encrypted

    async def chunks():
        for d in ({"reasoning_content": "sky "}, {"reasoning_content": "is blue"},
                  {"content": "Yes."}):
            yield ("data: " + json.dumps({"choices": [{"delta": d}]}) + "\n\n").encode()
        yield ("data: " + json.dumps({"choices": [{"delta": {}, "finish_reason": "stop"}]})
               + "\n\n").encode()

    async def run():
        es = EventStream({"id": "r", "error": None}, None, with_encrypted=True)
        return [json.loads(b.decode().split("data: ", 1)[1]) async for b in es.run(chunks())]
    ev = asyncio.run(run())
    assert [e["type"] for e in ev[2:7]] == [
        "response.output_item.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.output_item.done"]
    assert [e["sequence_number"] for e in ev] == list(range(len(ev)))
    done = ev[6]["item"]
    assert done["content"] == [{"type": "reasoning_text", "text": "sky is blue"}]
    assert done["encrypted_content"] == encrypted("sky is blue")
    final = ev[-1]["response"]["output"]
    assert [o["type"] for o in final] == ["reasoning", "message"]


def test_reasoning_items_given_back():
    from ostinato.server.responses import ResponsesRequest, encrypted, to_chat
    req = ResponsesRequest(input=[
        {"role": "user", "content": "q"},
        {"type": "reasoning", "summary": [], "encrypted_content": encrypted("t1")},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                          "text": "t2"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"role": "user", "content": "q2"}], reasoning={"summary": "auto", "effort": "none"},
        include=["reasoning.encrypted_content"], client_metadata={"session_id": "s"})
    req.check()
    chat, _ = to_chat(req, [])
    got = [(m["role"], m.get("reasoning_content")) for m in chat.messages]
    assert got == [("user", None), ("assistant", "t1"), ("tool", None), ("assistant", "t2"),
                   ("user", None)]
    assert chat.chat_template_kwargs == {"enable_thinking": False}


# ------------------------------------------- Response object shape (no model needed)
# The Open Responses spec's required fields of a Response, with the types a conforming
# server gives them (None: the field may be null); its compliance cases failed on these.
SPEC_FIELDS = {"id": str, "object": str, "created_at": int, "completed_at": (int, None),
               "status": str, "incomplete_details": (dict, None), "model": str,
               "previous_response_id": (str, None), "instructions": (str, None),
               "output": list, "error": (dict, None), "tools": list,
               "tool_choice": (str, dict), "truncation": str, "parallel_tool_calls": bool,
               "text": dict, "top_p": float, "presence_penalty": float,
               "frequency_penalty": float, "top_logprobs": int, "temperature": float,
               "reasoning": (dict, None), "usage": (dict, None),
               "max_output_tokens": (int, None), "max_tool_calls": (int, None),
               "store": bool, "background": bool, "service_tier": str, "metadata": dict,
               "safety_identifier": (str, None), "prompt_cache_key": (str, None)}


def _conforms(resp: dict) -> None:
    for key, kinds in SPEC_FIELDS.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        types = tuple(type(None) if k is None else k for k in kinds)
        assert key in resp and isinstance(resp[key], types), (key, resp.get(key))
    assert "format" in resp["text"]
    for tool in resp["tools"]:
        assert {"description", "parameters", "strict"} <= set(tool), tool
    if resp["reasoning"] is not None:
        assert {"effort", "summary"} <= set(resp["reasoning"])


def test_response_object_has_every_spec_field():
    from ostinato.server.responses import (
        ResponsesRequest,
        completed,
        message_item,
        response_object,
    )
    req = ResponsesRequest(input="hi", tools=[{"type": "function", "name": "f"}],
                           reasoning={"effort": "none"}, text={"verbosity": "medium"})
    head = response_object("resp_1", req, "m", "in_progress", [], None, 5)
    _conforms(head)
    assert head["completed_at"] is None and head["temperature"] == 1.0
    assert head["tools"] == [{"type": "function", "name": "f", "description": None,
                              "parameters": None, "strict": None}]
    assert head["text"] == {"verbosity": "medium", "format": {"type": "text"}}
    assert head["reasoning"] == {"effort": "none", "summary": None}
    done = completed({**head, "status": "completed", "output": [message_item("x")]})
    _conforms(done)
    assert isinstance(done["completed_at"], int) and done["completed_at"] >= 5
    assert completed({**head, "status": "incomplete"})["completed_at"] is None


def test_stream_snapshots_have_every_spec_field():
    import asyncio

    from ostinato.server.responses import EventStream, ResponsesRequest, response_object

    async def chunks():
        yield b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
        yield (b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": '
               b'{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}\n\n')

    async def run():
        head = response_object("r", ResponsesRequest(input="q"), "m", "in_progress", [],
                               None, 1)
        es = EventStream(head, None)
        return [json.loads(b.decode().split("data: ", 1)[1]) async for b in es.run(chunks())]
    ev = asyncio.run(run())
    for e in ev:
        if "response" in e:
            _conforms(e["response"])
    assert ev[0]["response"]["completed_at"] is None
    assert ev[-1]["type"] == "response.completed"
    assert isinstance(ev[-1]["response"]["completed_at"], int)
