"""Structured output through the real server and the official `openai` client: every answer
to a JSON schema parses and validates with `jsonschema`; regex, choice and grammars hold;
a constrained request is batch-invariant and equals the unconstrained answer when that one
already fits; bad constraints are 400s naming the problem."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from test_errors import assert_error

pytestmark = pytest.mark.model
MAX_TOKENS = 120        # every schema below is bounded well inside this

S = {"type": "string", "maxLength": 24}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}


def obj(*required: str, **props) -> dict:
    """A closed object schema (no other keys: a small model would otherwise ramble on in
    extra keys until max_tokens); properties not in `required` are optional."""
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}


# (what to ask for, the schema): nested objects, bounded arrays, enums, anyOf, optional
# properties, ranged numbers, patterned strings, $ref, const, null, top-level arrays
SCHEMAS = [
    ("a person named Ann aged 31", obj("name", "age", name=S, age={
        "type": "integer", "minimum": 0, "maximum": 120})),
    ("a user with a name and an email, and whether they are active", obj(
        "user", "active", active={"type": "boolean"}, user=obj(
            "name", "email", name=S,
            email={"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}))),
    ("a list of two to four fruit names", {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2,
        "maxItems": 4}),
    ("the colour of the sky", obj("colour", colour={"enum": ["red", "green", "blue"]})),
    ("a score, a number or a short word", obj("score", score={
        "anyOf": [SMALL, {"type": "string", "maxLength": 8}]})),
    ("a book, its title and maybe its year", obj("title", title=S, year={
        "type": "integer", "minimum": 1400, "maximum": 2030})),
    ("today's temperature in Celsius", obj("celsius", celsius={
        "type": "number", "minimum": -50, "maximum": 50})),
    ("the zip code of an address", obj("zip", zip={"type": "string", "pattern": "^[0-9]{5}$"})),
    ("one to three points on a grid", obj("points", points={
        "type": "array", "minItems": 1, "maxItems": 3, "items": obj(
            "x", "y", x={"type": "integer", "minimum": 0, "maximum": 9},
            y={"type": "integer", "minimum": 0, "maximum": 9})})),
    ("whether the task is done", obj("done", done={"type": "boolean"})),
    ("a point", obj("kind", "x", kind={"const": "point"}, x=SMALL)),
    ("a 2 by 2 matrix of digits", {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "integer", "minimum": 0, "maximum": 9}}}),
    ("a priority level", obj("level", level={"enum": [1, 2, 3]})),
    ("a shape: a circle or a square", {"anyOf": [
        obj("shape", "radius", shape={"const": "circle"}, radius=SMALL),
        obj("shape", "side", shape={"const": "square"}, side=SMALL)]}),
    ("a birthday", obj("date", date={"type": "string",
                                     "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"})),
    ("a person's first and middle names (the middle one may be null)", obj(
        "first", "middle", first=S, middle={"type": ["string", "null"], "maxLength": 10})),
    ("a ticket", obj("id", "status", "title", id=SMALL, status={"enum": ["open", "closed"]},
                     title=S)),
    ("a home and a work address", {
        "$defs": {"address": obj("city", city=S, number=SMALL)},
        **obj("home", "work", home={"$ref": "#/$defs/address"},
              work={"$ref": "#/$defs/address"})}),
    ("a company, its boss and the boss's car", obj("company", company=obj(
        "boss", boss=obj("car", car=obj("brand", brand=S))))),
    ("three traffic-light colours", {"type": "array", "minItems": 3, "maxItems": 3,
                                     "items": {"enum": ["red", "amber", "green"]}}),
    ("one to five small numbers", {"type": "array", "minItems": 1, "maxItems": 5,
                                   "items": SMALL}),
    ("a rating from 1 to 9", obj("rating", rating={
        "type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10})),
    ("a nickname", obj("nickname", nickname={"type": "string", "minLength": 3,
                                             "maxLength": 8})),
    ("a product with tags", obj("name", "price", "tags", name=S, price={
        "type": "number", "minimum": 0, "maximum": 1000}, tags={
        "type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3})),
]


def ask(what: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with JSON only: {what}."}]


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


async def _ask_all(server, bodies: list[dict]) -> list:
    """All at once, so the engine batches them (a generous timeout: a loaded 2-core machine)."""
    async with openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0,
                                  timeout=900) as c:
        return await asyncio.gather(*(c.chat.completions.create(**b) for b in bodies))


def test_every_schema_answer_validates(server):
    """All schemas at once (one batch): each answer parses, validates and ended by itself."""
    bodies = [dict(model=server.model, messages=ask(what), temperature=0,
                   max_tokens=MAX_TOKENS, response_format=json_schema_format(schema))
              for what, schema in SCHEMAS]
    answers = asyncio.run(_ask_all(server, bodies))
    assert len(SCHEMAS) >= 20
    for (what, schema), r in zip(SCHEMAS, answers):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (what, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_sampled_answers_validate_too(client, server):
    """temperature 1, several seeds: the mask holds for random sampling as for greedy."""
    what, schema = SCHEMAS[8]
    r = client.chat.completions.create(
        model=server.model, messages=ask(what), temperature=1.0, seed=7, n=4,
        max_tokens=MAX_TOKENS, response_format=json_schema_format(schema))
    assert len({c.message.content for c in r.choices}) > 1     # really sampled
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)


def test_json_object(client, server):
    r = client.chat.completions.create(
        model=server.model, messages=ask("a cat's name and age"), temperature=0,
        max_tokens=MAX_TOKENS, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field, value, check", [
    ("regex", r"[0-9]{3}-[0-9]{4}", lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ("choice", ["Paris", "London", "Rome"], lambda t: t in ("Paris", "London", "Rome")),
    ("grammar", 'start: "The answer is " ("yes" | "no") "."',
     lambda t: t in ("The answer is yes.", "The answer is no.")),
    ("grammar", 'root ::= "capital: " [A-Z] [a-z]{2,8}',       # GBNF
     lambda t: re.fullmatch(r"capital: [A-Z][a-z]{2,8}", t)),
])
def test_regex_choice_and_grammars(client, server, field, value, check):
    q = [{"role": "user", "content": "What is the capital of France?"}]
    for extra in ({"structured_outputs": {field: value}}, {f"guided_{field}": value}):
        r = client.chat.completions.create(model=server.model, messages=q, temperature=0,
                                           max_tokens=40, extra_body=extra)
        text = r.choices[0].message.content
        assert check(text), (extra, text)
        assert r.choices[0].finish_reason == "stop"


def test_completions_route(client, server):
    schema = SCHEMAS[0][1]
    for extra in ({"guided_json": schema}, {"structured_outputs": {"json": json.dumps(schema)}}):
        r = client.completions.create(model=server.model, prompt="A person as JSON: ",
                                      temperature=0, max_tokens=MAX_TOKENS, extra_body=extra)
        jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = client.completions.create(model=server.model, prompt="Is the sky blue? Answer: ",
                                  temperature=0, max_tokens=5,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")


def test_streamed_equals_whole(client, server):
    what, schema = SCHEMAS[16]
    body = dict(model=server.model, messages=ask(what), temperature=0, max_tokens=MAX_TOKENS,
                response_format=json_schema_format(schema))
    whole = client.chat.completions.create(**body).choices[0].message.content
    pieces, finishes = [], []
    for chunk in client.chat.completions.create(stream=True, **body):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finishes += [c.finish_reason] if c.finish_reason else []
    assert "".join(pieces) == whole and finishes == ["stop"]
    jsonschema.validate(json.loads(whole), schema)


def test_batch_invariance(server):
    """A constrained request's tokens alone == in a batch of 32 mixed requests (other schemas,
    unconstrained, sampled)."""
    what, schema = SCHEMAS[16]
    probe = dict(model=server.model, messages=ask(what), temperature=0, max_tokens=MAX_TOKENS,
                 response_format=json_schema_format(schema), logprobs=True)
    sampled = dict(probe, temperature=0.8, seed=3)
    alone = asyncio.run(_ask_all(server, [probe, sampled]))
    others = [dict(model=server.model, messages=ask(w), temperature=0.7, seed=i,
                   max_tokens=24, response_format=json_schema_format(s))
              for i, (w, s) in enumerate(SCHEMAS[:15])]
    others += [dict(model=server.model, messages=ask(w), max_tokens=24, temperature=0)
               for w, _ in SCHEMAS[:15]]
    batch = asyncio.run(_ask_all(server, [probe, *others[:15], sampled, *others[15:]]))
    assert len(batch) == 32

    def tokens(r):
        return [t.token for t in r.choices[0].logprobs.content]
    assert tokens(batch[0]) == tokens(alone[0])
    assert tokens(batch[16]) == tokens(alone[1])


def test_constrained_equals_unconstrained_when_already_valid(client, server):
    """Where the model's own greedy answer fits the schema, the mask never changes the argmax:
    the constrained answer is the same tokens (up to the end the grammar allows)."""
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    q = [{"role": "user", "content": "Give me a JSON object describing a person named Alice "
                                     "aged 30, with keys name and age."}]
    body = dict(model=server.model, messages=q, temperature=0, max_tokens=60, logprobs=True)
    free = client.chat.completions.create(**body).choices[0]
    held = client.chat.completions.create(
        **body, response_format=json_schema_format(schema)).choices[0]
    text = held.message.content
    assert free.message.content.startswith(text)          # the model went on after the JSON
    jsonschema.validate(json.loads(text), schema)
    free_tokens = [t.token for t in free.logprobs.content]
    held_tokens = [t.token for t in held.logprobs.content]
    end = len(held_tokens) - 1              # where the grammar ends the answer: <|im_end|>
    assert held_tokens[:end] == free_tokens[:end] and held_tokens[end] == "<|im_end|>"


# ------------------------------------------------------------------------------ bad input
def chat(http, server, **body):
    body = {"model": server.model, "messages": ask("x"), "max_tokens": 4, **body}
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": json_schema_format({"type": "foo"})}, "response_format", "foo"),
    ({"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
     "response_format", "uniqueItems"),
    ({"response_format": json_schema_format({"type": "string", "format": "colour"})},
     "response_format", "colour"),
    ({"response_format": json_schema_format({"$ref": "#/$defs/none"})}, "response_format",
     "none"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!",
                                                                 "schema": {}}}},
     "response_format", "name"),
    ({"guided_regex": "(?=a)b"}, "guided_regex", "look-around"),
    ({"guided_regex": "[a-"}, "guided_regex", "regex"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "one output constraint"),
    ({"structured_outputs": {"whitespace_pattern": " *"}}, "structured_outputs",
     "whitespace_pattern"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex",
     "response_format"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos", "structured"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "structured"),
])
def test_bad_constraints_are_400s(http, server, body, param, words):
    err = assert_error(chat(http, server, **body), 400, param)
    assert words in err["message"], err["message"]


def test_completions_refuse_response_format(http, server):
    r = http.post("/v1/completions", json={"model": server.model, "prompt": "x",
                                           "response_format": {"type": "json_object"}})
    assert_error(r, 400, "response_format")


def test_text_format_asks_for_nothing(client, server):
    r = client.chat.completions.create(model=server.model, messages=ask("hi"), max_tokens=4,
                                       temperature=0, response_format={"type": "text"})
    assert r.choices[0].message.content


def test_openai_parse_helper(client, server):
    """The client's own structured-output helper (a pydantic model -> strict json_schema)."""
    import pydantic

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        age: int = pydantic.Field(ge=0, le=120)
    r = client.chat.completions.parse(model=server.model, messages=ask("a person"),
                                      temperature=0, max_tokens=MAX_TOKENS,
                                      response_format=Person)
    assert isinstance(r.choices[0].message.parsed, Person)


def test_server_never_5xx_on_odd_schemas(http, server):
    for schema in ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5,
                                                           "maximum": 1}}},
                   {"type": "string", "minLength": 5, "maxLength": 2}, False, True, []):
        r = chat(http, server, response_format=json_schema_format(schema)) \
            if not isinstance(schema, list) else chat(http, server, guided_json=schema)
        assert r.status_code in (200, 400), (schema, r.status_code, r.text)

