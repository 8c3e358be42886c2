"""Tool calling through the real server and the official `openai` client: Qwen2.5-Coder-0.5B
(the hermes <tool_call> format its template writes) and SmolLM2 (no tool syntax: the generic
JSON form). Required and named choices give calls whose arguments validate against the tool's
schema; auto calls a tool when the prompt needs one; streamed deltas concatenate to exactly the
non-streamed call; a two-turn exchange with the tool's result completes; bad tools and choices
are 400s naming the problem."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from test_errors import assert_error

pytestmark = pytest.mark.model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PARIS = [{"role": "user", "content": "What's the weather like in Paris today?"}]
SUM = [{"role": "user", "content": "What is 17 plus 25? Use the add tool."}]
NAMED = {"type": "function", "function": {"name": "add"}}


def ask(client, model, messages=PARIS, **kw):
    kw = {"temperature": 0, "max_tokens": 80, "tools": TOOLS, **kw}
    return client.chat.completions.create(model=model, messages=messages, **kw)


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def check_calls(choice, allowed=SCHEMAS):
    """Every call names an allowed tool, has an id, and its arguments validate."""
    m = choice.message
    assert m.tool_calls and choice.finish_reason == "tool_calls"
    for c in m.tool_calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), allowed[c.function.name])
    assert len({c.id for c in m.tool_calls}) == len(m.tool_calls)


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_required_and_named_give_valid_calls(qwen_client, qwen_server, choice):
    r = ask(qwen_client, qwen_server.model, SUM, tool_choice=choice)
    check_calls(r.choices[0])
    assert r.choices[0].message.content is None
    if choice == NAMED:
        assert [n for n, _ in calls_of(r.choices[0].message)] == ["add"]


def test_auto_calls_the_tool_the_prompt_needs(qwen_client, qwen_server):
    r = ask(qwen_client, qwen_server.model)
    check_calls(r.choices[0])
    assert calls_of(r.choices[0].message) == [("get_weather", {"city": "Paris",
                                                               "unit": "celsius"})]


def test_named_choice_overrides_the_prompt(qwen_client, qwen_server):
    """Asked about the weather but held to `add`: the call is add's, valid for add."""
    r = ask(qwen_client, qwen_server.model, tool_choice=NAMED)
    check_calls(r.choices[0], {"add": SCHEMAS["add"]})


def test_none_never_calls(qwen_client, qwen_server):
    r = ask(qwen_client, qwen_server.model, tool_choice="none")
    m = r.choices[0].message
    assert not m.tool_calls and m.content and r.choices[0].finish_reason in ("stop", "length")


def test_no_tools_asks_for_nothing(qwen_client, qwen_server):
    """Without tools the answer is the plain chat answer, token for token."""
    plain = qwen_client.chat.completions.create(model=qwen_server.model, messages=SUM,
                                                temperature=0, max_tokens=30)
    empty = qwen_client.chat.completions.create(model=qwen_server.model, messages=SUM,
                                                temperature=0, max_tokens=30, tools=[])
    assert plain.choices[0].message.content == empty.choices[0].message.content


def streamed(client, model, **kw) -> tuple[list, dict]:
    """(the chunks' choices, the message they add up to: content and calls)."""
    chunks = list(ask(client, model, stream=True, **kw))
    content, calls, finishes = [], {}, []
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            content.append(d.content or "")
            for tc in d.tool_calls or []:
                if tc.id is not None:       # the first item of a call: id, type, name
                    assert tc.index == len(calls) and tc.type == "function"
                    assert tc.function.name and tc.function.arguments == ""
                    calls[tc.index] = [tc.id, tc.function.name, ""]
                else:
                    assert tc.function.name is None
                    calls[tc.index][2] += tc.function.arguments
            if c.finish_reason is not None:
                finishes.append(c.finish_reason)
                assert d.content is None and not d.tool_calls     # the finish comes alone
    assert len(finishes) == 1
    return finishes, {"content": "".join(content) or None, "calls": list(calls.values())}


@pytest.mark.parametrize("kw", [{}, {"tool_choice": "required"}, {"tool_choice": NAMED},
                                {"messages": SUM}, {"tool_choice": "none"}])
def test_stream_adds_up_to_the_whole_answer(qwen_client, qwen_server, kw):
    whole = ask(qwen_client, qwen_server.model, **kw).choices[0]
    finishes, got = streamed(qwen_client, qwen_server.model, **kw)
    assert finishes == [whole.finish_reason]
    assert got["content"] == whole.message.content
    assert [(n, a) for _, n, a in got["calls"]] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]


def test_two_turns_with_the_tool_result(qwen_client, qwen_server):
    """The call goes back as the assistant turn, its result as a tool message: the model
    answers in words, using the result."""
    first = ask(qwen_client, qwen_server.model).choices[0].message
    call = first.tool_calls[0]
    history = PARIS + [first.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id,
                        "content": "It is 21 degrees Celsius and sunny in Paris."}]
    r = ask(qwen_client, qwen_server.model, history, tool_choice="none", max_tokens=60)
    answer = r.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "21" in answer.message.content


def test_the_template_writes_tools_and_history(qwen_server):
    """/tokenize renders what the chat route renders: the tool definitions in the system
    turn, an earlier call with its arguments as an object, the result as a tool response."""
    import httpx
    msgs = PARIS + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(qwen_server.base + "/tokenize", json={"messages": msgs, "tools": TOOLS},
                   headers={"Authorization": "Bearer test-key-123"}, timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.post(qwen_server.base + "/detokenize", json={"tokens": r.json()["tokens"]},
                      headers={"Authorization": "Bearer test-key-123"}, timeout=60).json()
    text = text["prompt"]
    assert '"name": "add"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
           '</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_parallel_off_gives_one_call(qwen_client, qwen_server):
    msgs = [{"role": "user", "content": "Weather in Paris and in Rome?"}]
    r = ask(qwen_client, qwen_server.model, msgs, tool_choice="required",
            parallel_tool_calls=False)
    check_calls(r.choices[0])
    assert len(r.choices[0].message.tool_calls) == 1


def test_batch_invariance(qwen_client, qwen_server):
    """A held call is the same tokens alone and among 16 others at once."""
    alone = ask(qwen_client, qwen_server.model, SUM, tool_choice="required")

    async def many():
        async with openai.AsyncOpenAI(base_url=qwen_server.v1, api_key="test-key-123",
                                      max_retries=0, timeout=300) as c:
            asks = [c.chat.completions.create(
                model=qwen_server.model, messages=m, temperature=0, max_tokens=80,
                tools=TOOLS, tool_choice="required") for m in [SUM] + [PARIS] * 15]
            return await asyncio.gather(*asks)
    crowd = asyncio.run(many())
    raw = [(c.function.name, c.function.arguments) for r in (crowd[0], alone)
           for c in r.choices[0].message.tool_calls]
    assert raw[:len(raw) // 2] == raw[len(raw) // 2:] and raw
    assert crowd[0].usage.completion_tokens == alone.usage.completion_tokens


# ---------------------------------------------------------------- the generic form: SmolLM2
# parallel_tool_calls off: SmolLM2 (135M) allowed a list of calls goes on repeating them
def test_generic_form_required(client, server):
    r = ask(client, server.model, tool_choice="required", parallel_tool_calls=False)
    check_calls(r.choices[0])


def test_generic_form_auto_answers_or_calls(client, server):
    """Auto on a model with no tool syntax: the answer is held to one of the two JSON forms,
    so it is either calls or words, never the JSON itself."""
    for msgs in (PARIS, [{"role": "user", "content": "Say hello."}]):
        m = ask(client, server.model, msgs, parallel_tool_calls=False).choices[0]
        if m.message.tool_calls:
            check_calls(m)
        else:
            assert m.message.content and not m.message.content.lstrip().startswith("{")


def test_generic_form_two_turns(client, server, http):
    """The earlier call is written as the assistant's JSON and the tool's result as a user
    turn (the template knows neither), and the exchange completes."""
    msgs = PARIS + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    ids = http.post("/tokenize", json={"messages": msgs, "tools": TOOLS}).json()["tokens"]
    prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in prompt
    assert '<|im_start|>user\n{"tool_response": {"tool_call_id": "call_1", "content": ' \
           '"sunny, 21 C"}}' in prompt
    r = ask(client, server.model, msgs, max_tokens=60)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")


# ---------------------------------------------------------------- bad input
BAD = [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools",
     "bad name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools", "function"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "no tool named 'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}], "tool_choice": "required"},
     "tools", "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined with tools"),
    ({"messages": PARIS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages", "not valid JSON"),
    ({"functions": [{"name": "f"}]}, "functions", "function calling"),
]


@pytest.mark.parametrize("body, param, words", BAD)
def test_bad_tools_are_400s_naming_the_problem(http, server, body, param, words):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": PARIS,
                                                "max_tokens": 4, **body})
    err = assert_error(r, 400, param)
    assert words in err["message"], err
