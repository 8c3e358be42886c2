"""The bounded JSON reader of request bodies (server/protocol.load_bounded), without a
server: its C-speed pre-scan of nesting and size agrees with a walk of the parsed value on
any JSON, its two number paths read the same values, and every bound is a 400 naming it.
The same bounds through the real server: tests/server/test_hostile_requests.py."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from ostinato.server.protocol import (
    MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, APIError, _nesting, load_bounded)

# strings full of what a scanner could mistake for structure: quotes, escapes, brackets
TRICKY = st.text(alphabet=st.sampled_from(list('"\\[]{}ab,:') + ["\u00e9", "\U0001f600"]),
                 max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | TRICKY
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(TRICKY, inner, max_size=4), max_leaves=30)


def walk(value, depth: int = 0) -> tuple[int, int]:
    """(depth, count) of the arrays and objects of a parsed value, the plain way."""
    if not isinstance(value, (dict, list)):
        return depth, 0
    children = value.values() if isinstance(value, dict) else value
    found = [walk(v, depth + 1) for v in children]
    return max([depth + 1] + [d for d, _ in found]), 1 + sum(c for _, c in found)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.booleans())
def test_the_prescan_agrees_with_a_walk_of_the_parsed_value(value, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert _nesting(text) == walk(value)
    assert load_bounded(text) == json.loads(text)


@pytest.mark.parametrize("text", [
    b'[1, 2.5, -3e10, 1e-300, 12345678901234567890, 0.1]',
    b'{"e": "1e999 in a string", "n": 1e99, "x": -0.0}',
    b'{"s": "' + b"9" * 100 + b'", "n": 7}',                 # a long digit run in a string
    b'{"n": ' + b"1" * 64 + b"}",                            # the longest number allowed
])
def test_both_number_paths_read_what_json_reads(text):
    assert load_bounded(text) == json.loads(text)


def refusal(raw) -> str:
    with pytest.raises(APIError) as e:
        load_bounded(raw)
    assert e.value.status == 400
    return e.value.message


@pytest.mark.parametrize("raw,word", [
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nests"),
    (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), "nests"),
    (b"[" * 100_000, "nests"),                                   # unbalanced, not JSON
    (b"[" + b"{}," * MAX_JSON_CONTAINERS + b"{}]", "arrays and objects"),
    (b'{"n": ' + b"1" * 65 + b"}", "characters"),
    (b'{"n": 1e999}', "double's range"),
    (b'{"n": -1E+400}', "double's range"),
    (b'{"n": NaN}', "not a JSON value"),
    (b'{"s": "\\ud800"}', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
    (b'{"s": "\xed\xa0\x80"}', "surrogate"),                  # CESU-8: json lets it pass
    (b'{"s": "\xed\xa0\xbd\xed\xb8\x80"}', "surrogate"),   # a pair, CESU-8: not UTF-8
    ('{"s": "x"}'.encode("utf-16-le") + "\ud800".encode("utf-16-le", "surrogatepass"),
     "not valid JSON"),
    (b'"\\"[[[[' + b"\\" * 3, "not valid JSON"),              # escapes that never close
])
def test_each_bound_is_a_400_naming_it(raw, word):
    assert word in refusal(raw)


def test_brackets_and_escapes_inside_strings_do_not_count():
    deep = "[" * (MAX_JSON_DEPTH * 4) + '\\"{{{' + "\\\\"
    value = {"a": deep, "b": ["]]]" + deep, {"c": '"'}]}
    assert load_bounded(json.dumps(value)) == value
    assert _nesting(json.dumps(value).encode()) == (3, 3)


def test_exactly_the_limits_are_accepted():
    depth = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert _nesting(depth) == (MAX_JSON_DEPTH, MAX_JSON_DEPTH)
    load_bounded(depth)
    many = b"[" + b"[]," * (MAX_JSON_CONTAINERS - 2) + b"[]]"
    assert len(load_bounded(many)) == MAX_JSON_CONTAINERS - 1


def test_a_surrogate_pair_and_other_encodings_read_fine():
    assert load_bounded(b'{"s": "\\ud83d\\ude00"}') == {"s": "\U0001f600"}
    for encoding in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        assert load_bounded('{"s": [1, "\u00e9"]}'.encode(encoding)) == {"s": [1, "\u00e9"]}


def test_a_schema_given_as_text_is_read_the_same_way():
    assert load_bounded('{"type": "string"}', "the schema") == {"type": "string"}
    assert "the schema" in refusal_of_text("[" * 100 + "]" * 100)


def refusal_of_text(text: str) -> str:
    with pytest.raises(APIError) as e:
        load_bounded(text, "the schema")
    return e.value.message
