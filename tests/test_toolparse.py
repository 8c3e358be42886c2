"""The answer readers (ostinato/structured/toolparse.py): the same text, thought and calls
whether an answer comes whole or in pieces split anywhere, so streamed deltas concatenate to
the non-streamed message. No model: milliseconds."""
from __future__ import annotations

import json
import random
import re

import pytest

from ostinato.structured.toolparse import (
    CallArgs,
    CallStart,
    Reasoning,
    ReasoningParser,
    Text,
    ToolCallParser,
    parse_tool_calls,
    prompt_in_thought,
    thinks,
)

# (family, answer, text, [(name, arguments object)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Oslo"}}\n</tool_call>', "Let me check.", [("get_weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>', None,
     [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"s": "a } </tool \\" }"} }\n'
     '</tool_call>\ndone', "done", [("f", {"s": 'a } </tool " }'})]),
    ("hermes", '<tool_call>\n{"arguments": {"x": [1, {"y": 2}]}, "name": "g"}\n</tool_call>',
     None, [("g", {"x": [1, {"y": 2}]})]),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("hermes", "plain < text <tool", "plain < text <tool", []),
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "add", '
     '"arguments": {"a": 1}}', None, [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]),
    ("hermes", '{"answer": 42}', '{"answer": 42}', []),
    ("hermes", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', None,
     [("get_weather", {"city": "Paris"})]),
    ("hermes", '```\n{"name": "add", "arguments": {"a": 1}}\n```\n', None, [("add", {"a": 1})]),
    ("hermes", '```python\nprint("hi")\n```', '```python\nprint("hi")\n```', []),
    ("hermes", '`code` and more', '`code` and more', []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "get_weather", "parameters": {"city": "a;b"}}', None,
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "a;b"})]),
    ("llama3", ' {"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1,
                                                                                   "b": 2})]),
    ("llama3", "The answer is 3.", "The answer is 3.", []),
    ("llama3", "<|python", "<|python", []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', None,
     [("add", {"a": 1, "b": 2})]),
    ("mistral", 'Sure. [TOOL_CALLS] {"name": "add", "arguments": {"a": 1}}', "Sure.",
     [("add", {"a": 1})]),
    ("mistral", "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
    ("mistral_args", '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[CALL_ID]'
     'a1B2c3D4e[ARGS]{"city": "Nice"}', None, [("add", {"a": 1, "b": 2}),
                                               ("get_weather", {"city": "Nice"})]),
    ("mistral_args", 'Let me see.[TOOL_CALLS]add[ARGS]{"a": 1}', "Let me see.",
     [("add", {"a": 1})]),
    ("mistral_args", "[TOOL_CALLS]add[ARGS]{oops", "[TOOL_CALLS]add[ARGS]{oops", []),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome", '
     '"unit": "c"}}]}', None, [("get_weather", {"city": "Rome", "unit": "c"})]),
    ("generic", '{"response": "Hello there"}', "Hello there", []),
    ("generic", "plain words", "plain words", []),
    # text around calls keeps one separator; a call cut off inside its closing tag keeps its
    # arguments clean; JSON-looking text before a tagged call does not hide the call
    ("hermes", 'Hi <tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
     '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call> bye', "Hi bye",
     [("add", {"a": 1}), ("add", {"a": 2})]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_c', None,
     [("add", {"a": 1})]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n<', None,
     [("add", {"a": 1})]),
    ("hermes", '{"a": 1}\n<tool_call>\n{"name": "add", "arguments": {"b": 2}}\n</tool_call>',
     '{"a": 1}', [("add", {"b": 2})]),
    ("hermes", '```json\n{"a": 1}\n```\n<tool_call>\n{"name": "add", "arguments": {}}\n'
     '</tool_call>', '```json\n{"a": 1}\n```', [("add", {})]),
    # nesting past Python's recursion limit is text, not a crash
    ("hermes", "[" * 5000, "[" * 5000, []),
    ("generic", '{"tool_calls": ' + "[" * 5000, '{"tool_calls": ' + "[" * 5000, []),
    ("hermes", "<tool_call>" + '{"a":' * 3000 + "1" + "}" * 3000 + "</tool_call>",
     "<tool_call>" + '{"a":' * 3000 + "1" + "}" * 3000 + "</tool_call>", []),
]


def merged(events) -> tuple[str, str, list[tuple[str, str, str]]]:
    """(text, thought, [(id, name, arguments)]) of a stream of events."""
    text, thought, calls = [], [], {}
    for e in events:
        if isinstance(e, Text):
            text.append(e.text)
        elif isinstance(e, Reasoning):
            thought.append(e.text)
        elif isinstance(e, CallStart):
            assert e.index == len(calls) and e.call.arguments == ""
            calls[e.index] = [e.call.id, e.call.name, ""]
        else:
            assert isinstance(e, CallArgs) and e.index == len(calls) - 1
            calls[e.index][2] += e.fragment
    return "".join(text), "".join(thought), [tuple(c) for c in calls.values()]


def run(parser, pieces):
    events = []
    for p in pieces:
        events += parser.feed(p)
    return events + parser.finish()


def splits(text: str, rng: random.Random):
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), 5)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("family, answer, text, calls", CASES)
def test_whole_answers(family, answer, text, calls):
    got_text, got = parse_tool_calls(answer, family)
    assert got_text == text
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got)
    for c in got:       # Mistral's templates refuse any id but 9 letters and digits
        assert re.fullmatch("[A-Za-z0-9]{9}", c.id) if family.startswith("mistral") \
            else c.id.startswith("call_")


@pytest.mark.parametrize("family, answer, text, calls", CASES)
def test_pieces_give_the_whole(family, answer, text, calls):
    rng = random.Random(answer)
    whole = ToolCallParser(family)
    want = merged(run(whole, [answer]))
    for pieces in splits(answer, rng):
        p = ToolCallParser(family)
        got = merged(run(p, pieces))
        assert (got[0], [c[1:] for c in got[2]]) == (want[0], [c[1:] for c in want[2]]), pieces
        # the streamed arguments are the call's arguments exactly
        assert [c[2] for c in got[2]] == [c.arguments for c in p.calls]
        assert [c[0] for c in got[2]] == [c.id for c in p.calls]


@pytest.mark.parametrize("family, answer", [
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {"path": "/"}}\n</tool_call>'),
    ("hermes", '{"name": "rm_rf", "arguments": {}}'),
    ("llama3", '{"name": "rm_rf", "parameters": {}}'),
    ("mistral", '[TOOL_CALLS][{"name": "rm_rf", "arguments": {}}]'),
    ("mistral_args", "[TOOL_CALLS]rm_rf[ARGS]{}"),
    ("generic", '{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}'),
])
def test_a_call_of_a_tool_not_given_is_text(family, answer):
    """Only the request's tools are called: a call of any other name stays text (whole or
    in pieces)."""
    for pieces in ([answer], list(answer)):
        p = ToolCallParser(family, names={"get_weather", "add"})
        text, _, calls = merged(run(p, pieces))
        assert calls == [] and p.calls == [] and text == answer.strip()
    p = ToolCallParser("hermes", names={"add"})     # the text around it is kept as it was
    text, _, _ = merged(run(p, ["  a  <tool_call>{\"name\": \"zz\", \"arguments\": {}}"
                                "</tool_call>  b "]))
    assert text == 'a  <tool_call>{"name": "zz", "arguments": {}}</tool_call>  b'


def test_hermes_arguments_stream_before_the_call_ends():
    p = ToolCallParser("hermes")
    events = p.feed('<tool_call>\n{"name": "write", "arguments": {"path": "a.py", "text": "x')
    assert isinstance(events[0], CallStart) and events[0].call.name == "write"
    assert "".join(e.fragment for e in events[1:]) == '{"path": "a.py", "text": "x'
    rest = p.feed(' = 1"}}\n</tool_call>') + p.finish()
    assert "".join(e.fragment for e in rest) == ' = 1"}'
    assert json.loads(p.calls[0].arguments) == {"path": "a.py", "text": "x = 1"}


THOUGHTS = [
    (False, "<think>\nLet me add.\n</think>\n\nIt is 3.", "Let me add.", "It is 3."),
    (False, "It is 3.", "", "It is 3."),
    (False, "  <think>a</think>b", "a", "b"),
    (True, "Thinking on.\n</think>\n\nDone", "Thinking on.", "Done"),
    (True, "cut off in the thought", "cut off in the thought", ""),
    (False, "<thin", "", "<thin"),
]


@pytest.mark.parametrize("in_thought, answer, thought, text", THOUGHTS)
def test_reasoning_split(in_thought, answer, thought, text):
    rng = random.Random(answer)
    for pieces in splits(answer, rng):
        got_text, got_thought, _ = merged(run(ReasoningParser(in_thought), pieces))
        assert (got_thought, got_text) == (thought, text), pieces


def test_thinking_templates():
    assert thinks("{{ '<think>' }}...{{ '</think>' }}") and not thinks("{{ messages }}")
    assert not thinks(None)
    assert prompt_in_thought("<|im_start|>assistant\n<think>\n")
    assert not prompt_in_thought("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_in_thought("<|im_start|>assistant\n")
