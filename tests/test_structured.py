"""Structured output below the server: the constraint spec, the grammar compiler (errors,
cache, time limit, bounded whitespace), the token mask checked against the vocabulary by
brute force, and the engine: constrained == unconstrained when the model's answer already
fits, batch invariance, preemption / chunked prefill / prefix caching with constraints."""
from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest

from ostinato.params import SamplingParams, StructuredOutputsParams as SO

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ALICE = [{"role": "user", "content": "Give me a JSON object describing a person named Alice "
                                     "aged 30, with keys name and age."}]


# ------------------------------------------------------------------------------ the spec
def test_exactly_one_constraint():
    assert SO(json=PERSON).kind == "json" and SO(choice=["a"]).kind == "choice"
    assert SO(json_object=True).kind == "json_object"
    for bad in ({}, {"json": PERSON, "regex": "a"}, {"json_object": False}):
        with pytest.raises(ValueError, match="exactly one"):
            SO(**bad)
    for bad, words in (({"choice": []}, "non-empty list"), ({"choice": ["a", 1]}, "strings"),
                       ({"regex": ""}, "non-empty"), ({"json": 3}, "JSON schema"),
                       ({"json_object": "yes"}, "true")):
        with pytest.raises(ValueError, match=words):
            SO(**bad)


def test_sampling_params_take_a_dict_and_refuse_what_fights_the_grammar():
    p = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert p.structured_outputs == SO(regex="[0-9]+")
    assert p.structured_outputs.key() == SO(regex="[0-9]+").key()
    assert SO(json={"b": 1, "a": 2}).key() == SO(json={"a": 2, "b": 1}).key()
    with pytest.raises(ValueError, match="unexpected keyword argument 'whitespace'"):
        SamplingParams(structured_outputs={"regex": "a", "whitespace": " "})
    for field, value in (("ignore_eos", True), ("min_tokens", 3)):
        with pytest.raises(ValueError, match=f"{field}.*structured_outputs"):
            SamplingParams(structured_outputs={"regex": "a"}, **{field: value})


# ------------------------------------------------------------------------- the compiler
@pytest.fixture(scope="module")
def tok(smollm_path):
    from ostinato.loader.gguf import read_gguf
    from ostinato.tokenizer import Tokenizer
    gf = read_gguf(smollm_path)
    try:
        return Tokenizer.from_gguf(gf.metadata, str(smollm_path))
    finally:
        gf.close()


@pytest.fixture(scope="module")
def compiler(tok):
    from ostinato.structured import GrammarCompiler
    return GrammarCompiler(tok, tok.eos_token_ids, tok.vocab_size)


@pytest.mark.model
@pytest.mark.parametrize("spec, words", [
    (SO(json={"type": "foo"}), "foo"),
    (SO(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (SO(json={"type": "object", "if": {}}), "if"),
    (SO(json={"type": "string", "format": "colour"}), "colour"),
    (SO(json={"type": "string", "minLength": 5, "maxLength": 2}), "minLength"),
    (SO(json={"$ref": "#/$defs/missing"}), "missing"),
    (SO(json="{not json"), "not valid JSON"),
    (SO(json={"type": "object", "x-guidance": {"lenient": True}}), "x-guidance"),
    (SO(regex="(?<=a)b"), "look-around"),
    (SO(regex="[a-"), "regex"),
    (SO(grammar="start: undefined_rule"), "undefined_rule"),
    (SO(grammar="root ::= [a-"), "grammar"),
])
def test_bad_constraints_raise_naming_the_problem(compiler, spec, words):
    from ostinato.structured import GrammarError
    with pytest.raises(GrammarError, match=re.escape(words)):
        compiler.compile(spec)


@pytest.mark.model
def test_compiles_are_cached_and_time_limited(tok, compiler):
    from ostinato.structured import GrammarCompiler, GrammarError
    g = compiler.compile(SO(json=PERSON))
    assert compiler.compile(SO(json=json.loads(json.dumps(PERSON)))) is g
    assert compiler.compile(SO(regex="[0-9]+")) is not g
    # a big schema (200 patterned properties) cannot compile in no time at all
    big = {"type": "object", "properties": {f"p{i}": {"type": "string",
                                                      "pattern": f"^[a-z]{{{i % 7 + 1}}}x$"}
                                            for i in range(200)}}
    strict = GrammarCompiler(tok, tok.eos_token_ids, tok.vocab_size, timeout_s=0.0)
    strict.llg_tokenizer()
    with pytest.raises(GrammarError, match="longer than 0 s"):
        strict.compile(SO(json=big))
    assert compiler.compile(SO(json=big)).compile_s < 5     # the default limit is 5 s


@pytest.mark.model
def test_a_grammar_over_the_size_limit_is_refused(compiler):
    # GBNF's conversion to Lark runs in pure Python before the compile's time limit (a
    # 16 MB literal: about 35 s here; a chain of rules: quadratic)
    from ostinato.structured import GrammarError
    from ostinato.structured.compiler import MAX_GRAMMAR_CHARS
    with pytest.raises(GrammarError, match="over this server's limit of 65536"):
        compiler.compile(SO(grammar='root ::= "' + "a" * MAX_GRAMMAR_CHARS + '"'))
    compiler.compile(SO(grammar='root ::= "' + "a" * 60_000 + '"'))     # under it: compiles


@pytest.mark.parametrize("text", [
    'start: "a"', '  start : "a"', "\n\n\t start\n\n:\n 'a'", "%llguidance {}\nstart: x",
    "%llguidancex\nroot ::= x", 'root ::= "a"', "root ::= start", "\n" * 3000 + "start: x",
    "\n \n" * 2000 + 'root ::= "a"', "x start: y", "", "   ", "\r\nstart: a\r\n",
    "\u2028start: a", "starting: a", "# start: a\nroot ::= x"])
def test_the_lark_test_answers_as_llguidances_does(text):
    # llguidance's is_lark_syntax is a multi-line ^\s* regex, quadratic in a run of blank
    # lines (40,000 held the GIL for 19 s): ours, one pass over the lines, must answer as it
    # does
    from llguidance.gbnf_to_lark import is_lark_syntax
    from ostinato.structured.compiler import _is_lark
    assert _is_lark(text) == is_lark_syntax(text), repr(text[:40])


def feed(constraint, tok, text: str) -> None:
    for t in tok.encode(text, add_special_tokens=False):
        assert not constraint.forbidden()[t], (text, tok.decode([t]))
        constraint.advance(t)


@pytest.mark.model
def test_json_whitespace_is_bounded(tok, compiler):
    grammar = compiler.compile(SO(json=PERSON))
    for ok in ('{"name":"A","age":1}', '{"name": "A", "age": 1}',
               '{\n    "name": "A",\n    "age": 1\n}'):
        c = grammar.new_constraint()
        feed(c, tok, ok)
        assert c.done
    for bad in (' {"name":"A"', '{\n\n"name":"A"', '{' + ' ' * 21 + '"name"'):
        c = grammar.new_constraint()
        with pytest.raises((AssertionError, RuntimeError)):
            feed(c, tok, bad)


@pytest.mark.model
def test_mask_matches_the_vocabulary(tok, compiler):
    """For regex [a-z]{1,4}: the allowed tokens are exactly those spelling 1-4 letters, by
    brute force over every token's bytes; then those that fit what is left, or the end."""
    c = compiler.compile(SO(regex="[a-z]{1,4}")).new_constraint()

    def allowed() -> set[int]:
        return set((~c.forbidden()).nonzero()[0].tolist())
    size = {t: len(tok.token_to_bytes(t)) for t in range(tok.vocab_size)
            if not tok.is_special(t) and re.fullmatch(rb"[a-z]{1,4}", tok.token_to_bytes(t))}
    assert allowed() == set(size) and len(size) > 1000
    two = min(t for t, n in size.items() if n == 2)
    c.advance(two)
    eos = set(tok.eos_token_ids)
    assert allowed() == {t for t, n in size.items() if n <= 2} | eos
    c.advance(two)
    assert c.done and allowed() == eos


@pytest.mark.model
def test_parallel_masks_equal_one_at_a_time(tok, compiler):
    """fill_masks (llguidance's thread pool, one call per step) == each mask on its own."""
    from ostinato.structured import fill_masks
    specs = [SO(json=PERSON), SO(regex="[a-z]{1,4}"), SO(choice=["yes", "no"]), SO(json=PERSON)]
    prefixes = ['{"name": "Al', "ab", "", "{"]

    def make():
        cs = [compiler.compile(s).new_constraint() for s in specs]
        for c, text in zip(cs, prefixes):
            for t in tok.encode(text, add_special_tokens=False):
                c.advance(t)
        return cs
    alone = [c.forbidden().copy() for c in make()]
    together = make()
    fill_masks(together)
    for a, c in zip(alone, together):
        assert (c.forbidden() == a).all()
    assert not (alone[0] == alone[3]).all()      # different states, different masks


@pytest.mark.model
def test_special_tokens_are_never_spelled(tok, compiler):
    """A grammar that allows any text still forbids control tokens such as <|im_start|>."""
    c = compiler.compile(SO(regex="[\\s\\S]{0,50}")).new_constraint()
    forbidden = c.forbidden()
    im_start = tok.token_id("<|im_start|>")
    assert forbidden[im_start] and not forbidden[tok.encode("hi", False)[0]]


# ------------------------------------------------------------------------------ engine
@pytest.mark.model
def test_constrained_equals_unconstrained_when_already_valid(smollm_llm):
    llm = smollm_llm
    free = llm.chat(ALICE, SamplingParams(temperature=0, max_tokens=60))[0].outputs[0]
    held = llm.chat(ALICE, SamplingParams(temperature=0, max_tokens=60,
                                          structured_outputs={"json": PERSON}))[0].outputs[0]
    # the model wrote the JSON, then went on: the mask never changed its argmax, and the
    # grammar ended the answer where the JSON ends
    jsonschema.validate(json.loads(held.text), PERSON)
    assert held.finish_reason == "stop"
    assert held.token_ids[:-1] == free.token_ids[:len(held.token_ids) - 1]
    assert held.token_ids[-1] in llm.tokenizer.eos_token_ids
    # a constraint the whole free answer (end included) satisfies gives the same answer
    q = [{"role": "user", "content": "Give the name and age of a person named Bob who is 40."}]
    free = llm.chat(q, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert free.finish_reason == "stop" and re.fullmatch(r"[A-Za-z0-9 .,-]+", free.text)
    held = llm.chat(q, SamplingParams(temperature=0, max_tokens=40, structured_outputs={
        "regex": r"[A-Za-z0-9 .,-]+"}))[0].outputs[0]
    assert held.token_ids == free.token_ids and held.text == free.text


def _mixed_batch(probe: SamplingParams, sampled: SamplingParams) -> list:
    """32 requests: the two probes and 30 others (other constraints, free, sampled)."""
    others = []
    for i in range(30):
        so = [{"json": PERSON}, {"regex": "[a-z ]{1,30}"}, {"choice": ["yes", "no"]}, None][i % 4]
        others.append(SamplingParams(temperature=0.9 if i % 3 else 0, seed=i, max_tokens=30,
                                     structured_outputs=so))
    return [probe, *others[:15], sampled, *others[15:]]


@pytest.mark.model
def test_batch_invariance(smollm_llm):
    llm = smollm_llm
    probe = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": PERSON})
    sampled = SamplingParams(temperature=1.0, seed=11, max_tokens=60,
                             structured_outputs={"json": PERSON})
    alone = [llm.chat(ALICE, p)[0].outputs[0].token_ids for p in (probe, sampled)]
    params = _mixed_batch(probe, sampled)
    outs = llm.chat([ALICE] * len(params), params)
    assert len(outs) == 32
    assert outs[0].outputs[0].token_ids == alone[0]
    assert outs[16].outputs[0].token_ids == alone[1]
    for o in (outs[0], outs[16]):
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


@pytest.mark.model
def test_held_greedy_rows_in_one_call_equal_one_at_a_time(smollm_llm):
    """Greedy rows held by a grammar take their masks and argmaxes for all rows at once
    (ModelRunner._held_greedy): the same tokens, log-probabilities and finishes as each row
    processed on its own (quick_greedy off), in a batch mixing them with sampled and free
    rows."""
    llm, runner = smollm_llm, smollm_llm.engine.runner
    probe = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": PERSON})
    params = _mixed_batch(probe, SamplingParams(temperature=1.0, seed=11, max_tokens=60,
                                                structured_outputs={"json": PERSON}))
    taken, held = [], runner._held_greedy

    def counted(plan, spans, logits):
        got = held(plan, spans, logits)
        taken.append(sum(v is not None for v in got.values()))
        return got
    runner._held_greedy = counted
    try:
        fast = llm.chat([ALICE] * len(params), params)
        runner.quick_greedy = False
        slow = llm.chat([ALICE] * len(params), params)
    finally:
        runner.quick_greedy = True
        del runner._held_greedy
    assert sum(taken) > 50           # the held greedy rows went the quick way, step after step
    for a, b in zip(fast, slow):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason


@pytest.mark.model
def test_n_choices_each_hold(smollm_llm):
    out = smollm_llm.chat(ALICE, SamplingParams(n=4, temperature=1.2, seed=5, max_tokens=60,
                                                structured_outputs={"json": PERSON}))[0]
    assert len({c.text for c in out.outputs}) > 1
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), PERSON)


@pytest.mark.model
def test_preemption_chunking_and_prefix_cache_keep_the_constraint(smollm_path, smollm_llm):
    """A small KV cache (preemptions), 32-token steps (chunked prefill), prompts sharing a
    long prefix (prefix-cache hits): every constrained answer equals its solo answer."""
    from ostinato import LLM
    system = {"role": "system", "content": "You are a careful assistant who answers every "
              "question with one JSON object, with no extra words, and always fills in the "
              "name and the age of the person asked about."}
    people = ["Ann, 31", "Bob, 40", "Cy, 7", "Di, 65", "Ed, 19", "Flo, 88", "Gus, 23",
              "Hal, 50", "Ivy, 12", "Jo, 77"]
    convs = [[system, {"role": "user", "content": f"Describe {p} as JSON."}] for p in people]
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": PERSON})
    solo = [smollm_llm.chat(c, params)[0].outputs[0].token_ids for c in convs]
    tight = LLM(smollm_path, max_model_len=256, kv_cache_gb=0.008, max_num_batched_tokens=32)
    outs = tight.chat(convs, params)
    st = tight.engine.stats
    assert st.preemptions > 0 and st.prefix_cache_hits > 0, st
    assert [o.outputs[0].token_ids for o in outs] == solo
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


@pytest.mark.model
def test_bad_schema_raises_in_the_offline_api(smollm_llm):
    from ostinato.structured import GrammarError
    with pytest.raises(GrammarError, match="uniqueItems"):
        smollm_llm.generate("x", SamplingParams(structured_outputs={
            "json": {"type": "array", "uniqueItems": True}}))
    assert not smollm_llm.engine.has_unfinished()


@pytest.mark.model
def test_async_engine_compiles_off_the_engine_thread(smollm_llm):
    from ostinato.engine.async_engine import AsyncEngine
    from ostinato.structured import GrammarError
    grammars = smollm_llm.engine.grammars
    threads, real = [], grammars.compile

    def spy(spec):
        threads.append(threading.current_thread().name)
        return real(spec)
    ae = AsyncEngine(smollm_llm.engine)
    ae.start()
    grammars.compile = spy
    ids = smollm_llm.chat_prompt_ids(ALICE)

    async def run(so):
        return [d async for d in ae.generate(ids, SamplingParams(
            temperature=0, max_tokens=60, structured_outputs=so), f"r{len(threads)}")]
    try:
        deltas = asyncio.run(run({"json": PERSON}))
        text = "".join(d.text for d in deltas)
        jsonschema.validate(json.loads(text), PERSON)
        assert deltas[-1].finish_reason == "stop"
        with pytest.raises(GrammarError, match="look-around"):
            asyncio.run(run({"regex": "(?=x)"}))
    finally:
        grammars.compile = real
        ae.shutdown()
    assert threads and "ostinato-engine" not in threads


@pytest.mark.model
def test_bench_structured_figures(smollm_llm):
    """`ostinato bench --structured` in miniature: the figures and the report's table."""
    from ostinato.bench.report import markdown
    from ostinato.bench.structured import structured_bench
    fig = structured_bench(smollm_llm, streams=(1, 2), tokens=6, repeats=1, compiles=4,
                           log=lambda _: None)
    assert [r["streams"] for r in fig["decode"]] == [1, 2]
    assert all(r["free_tok_s"] > 0 and r["json_tok_s"] > 0 for r in fig["decode"])
    assert 0 < fig["compile"]["compile_p50_ms"] <= fig["compile"]["compile_p99_ms"]
    assert fig["ttft"]["json_ttft_p50_ms"] > 0
    assert not smollm_llm.engine.has_unfinished()
    md = markdown({"model": "m", "structured": fig})
    assert "| 2 |" in md and "compile: p50" in md


@pytest.mark.model
def test_gemma3_vocabulary_and_answer(gemma_path):
    """Gemma 3's SentencePiece vocabulary (262k pieces, '▁' for a space): the mask matches it
    by brute force, and a schema-held answer validates and ends on an end token."""
    from ostinato import LLM
    from ostinato.structured import GrammarCompiler
    llm = LLM(gemma_path, max_model_len=512)
    tok = llm.tokenizer
    compiler = GrammarCompiler(tok, tok.eos_token_ids, llm.config.vocab_size)
    c = compiler.compile(SO(regex="[ a-z]{1,3}")).new_constraint()
    allowed = set((~c.forbidden()).nonzero()[0].tolist())
    spelled = {t for t in range(tok.vocab_size) if not tok.is_special(t)
               and re.fullmatch(rb"[ a-z]{1,3}", tok.token_to_bytes(t))}
    assert allowed == spelled and len(spelled) > 1000
    out = llm.chat(ALICE, SamplingParams(temperature=0, max_tokens=40,
                                         structured_outputs={"json": PERSON}))[0].outputs[0]
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.finish_reason == "stop" and out.token_ids[-1] in tok.eos_token_ids


@pytest.mark.model
def test_vacuous_property_names_compile(tok, compiler):
    """propertyNames {"type": "string"} (every key is a string; zod writes it for a record,
    Claude Code's tools carry it) is dropped before compiling; a property that is named
    propertyNames is kept; any other propertyNames is still llguidance's to refuse."""
    from ostinato.structured import GrammarError
    from ostinato.structured.compiler import compilable
    record = {"type": "object", "propertyNames": {"type": "string"},
              "additionalProperties": {"type": "integer"}}
    named = {"type": "object", "properties": {"propertyNames": {"type": "string"}},
             "required": ["propertyNames"]}
    assert compilable({"type": "object", "properties": {"meta": record}}) == \
        {"type": "object", "properties": {"meta": {"type": "object", "additionalProperties":
                                                   {"type": "integer"}}}}
    assert compilable(named) == named
    compiler.compile(SO(json={"type": "object", "properties": {"meta": record}}))
    assert _accepts(tok, compiler, f"start: %json {json.dumps(named)}",
                    '{"propertyNames": "x"}')
    with pytest.raises(GrammarError, match="propertyNames"):
        compiler.compile(SO(json={"type": "object", "propertyNames": {"pattern": "^a"}}))


def _accepts(tok, compiler, grammar: str, text: str) -> bool:
    """Whether the grammar lets `text` (as the tokenizer splits it) through and then ends."""
    c = compiler.compile(SO(grammar=grammar)).new_constraint()
    for t in tok.encode(text, add_special_tokens=False):
        if c.forbidden()[t]:
            return False
        c.advance(t)
    return not c.forbidden()[tok.eos_token_id]


@pytest.mark.model
@pytest.mark.parametrize("spec, good, bad", [
    (SO(json={"type": "object", "properties": {"blue": {"type": "boolean"}},
              "required": ["blue"], "additionalProperties": False}),
     '{"blue": true}', '{"red": 1}'),
    (SO(json_object=True), '{"a": [1]}', "[1]"),
    (SO(choice=["yes", "no"]), "no", "maybe"),
    (SO(regex="[0-9]{2}/[0-9]{2}"), "12/31", "1/31"),
    (SO(regex=r"a\/b"), "a/b", "a\\/b"),          # an escaped slash stays escaped
    (SO(regex=r"x\\/y"), "x\\/y", "x/y"),         # an escaped backslash, then a slash
    (SO(regex="p\nq"), "p\nq", "pq"),              # a newline in the pattern
])
def test_a_thought_comes_before_the_constraint(tok, compiler, spec, good, bad):
    """On a model that thinks, the constraint holds the answer after a free thought: an
    optional <think>...</think> first, or (the prompt opened it) the rest of the thought."""
    from ostinato.structured.compiler import after_thought, answer_lark
    lark = answer_lark(spec)
    free = after_thought(lark, in_thought=False)
    assert _accepts(tok, compiler, free, good)
    assert _accepts(tok, compiler, free, f"<think>\nno idea {{}} </thin </think>\n\n{good}")
    assert not _accepts(tok, compiler, free, bad)
    assert not _accepts(tok, compiler, free, f"<think>\nhm\n</think>\n\n{bad}")
    inside = after_thought(lark, in_thought=True)
    assert _accepts(tok, compiler, inside, f"so {{ [ \n</think>\n\n{good}")
    assert not _accepts(tok, compiler, inside, good)        # the thought must close first
    assert not _accepts(tok, compiler, inside, f"so\n</think>\n\n{bad}")


# ------------------------------------------------------------- tools (served: tests/server/test_tools.py)
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}]


@pytest.mark.parametrize("tools, words", [
    ([], "non-empty"), ([{"type": "code_interpreter"}], "function"),
    ([{"type": "function", "function": {"name": "bad name"}}], "bad name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters"),
    ([{"type": "function", "function": {"name": "f", "extra": 1}}], "extra"),
    ([WEATHER[0], WEATHER[0]], "defined twice"),
])
def test_malformed_tools_are_named(tools, words):
    from ostinato.structured.tools import check_tools
    with pytest.raises(ValueError, match=words):
        check_tools(tools)


def test_tool_choice_schemas():
    """The list of calls a choice allows (ToolPlan.calls_schema: the generic and mistral
    forms hold it), and the choices that are no choice at all."""
    from ostinato.structured.tools import ToolPlan, check_tool_choice, check_tools
    tools = check_tools(WEATHER)

    def plan(choice, parallel=True):
        return ToolPlan("generic", tools, WEATHER, check_tool_choice(tools, choice), parallel)
    assert plan("none").grammar(lambda text: None) is None and not plan("none").active
    assert plan("auto").calls_schema() == plan("required").calls_schema()
    req = plan("required").calls_schema()
    call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    jsonschema.validate([call, {"name": "get_weather", "arguments": {"city": "Oslo"}}], req)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "arguments": {"a": 1}}], req)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], req)
    named = plan({"type": "function", "function": {"name": "add"}}).calls_schema()
    jsonschema.validate([call], named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "x"}}], named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([call, call], named)
    with pytest.raises(ValueError, match="no tool named 'nope'"):
        plan({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tool_choice"):
        plan("sometimes")
    one = plan("required", parallel=False).calls_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([call, call], one)


CALL_TEXTS = {  # family -> (a held call of add(a=1, b=2), the same calling an unknown tool)
    "hermes": ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
               '<tool_call>\n{"name": "sub", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    "llama3": ('{"name": "add", "parameters": {"a": 1, "b": 2}}',
               '{"name": "sub", "parameters": {"a": 1, "b": 2}}'),
    "mistral": ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
                '[TOOL_CALLS][{"name": "sub", "arguments": {"a": 1, "b": 2}}]'),
    "mistral_args": ('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}',
                     '[TOOL_CALLS]sub[ARGS]{"a": 1, "b": 2}'),
    "generic": ('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}',
                '{"tool_calls": [{"name": "sub", "arguments": {"a": 1, "b": 2}}]}'),
}


@pytest.mark.model
@pytest.mark.parametrize("family", sorted(CALL_TEXTS))
@pytest.mark.parametrize("choice", ["required", "add", "auto"])
def test_each_family_holds_its_own_call_form(tok, compiler, family, choice):
    """Every family's grammar lets its call form through and reads it back as the call;
    required and a named function refuse a call of a tool that is not there (auto in
    hermes and generic too; llama3's and the mistrals' auto is free, not held)."""
    from ostinato.structured.toolparse import parse_tool_calls
    from ostinato.structured.tools import ToolPlan, check_tools
    plan = ToolPlan(family, check_tools(WEATHER), WEATHER, choice)
    good, bad = CALL_TEXTS[family]
    grammar = plan.grammar(lambda text: None)
    if grammar is None:
        assert choice == "auto" and family in ("llama3", "mistral", "mistral_args")
    else:
        assert _accepts(tok, compiler, grammar, good)
        assert not _accepts(tok, compiler, grammar, bad)
    content, calls = parse_tool_calls(good, family)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("add", {"a": 1, "b": 2})]


@pytest.mark.model
def test_calls_read_not_held_are_checked_against_their_schema(tok, compiler):
    """A call the grammar did not hold (a bare hermes call, llama3's and the mistrals' auto)
    comes back as a call only if its arguments hold the tool's schema; else it is text."""
    from ostinato.structured.toolparse import ToolCallParser
    from ostinato.structured.tools import arguments_check, check_tools
    tools = check_tools(WEATHER)
    valid = arguments_check(compiler, tok, tools)
    assert valid("get_weather", '{"city": "Oslo"}') and valid("add", '{"a": 1, "b": 2}')
    assert not valid("get_weather", '{"city": 7}') and not valid("add", '{"a": 1}')
    for answer, calls in (('{"name": "add", "arguments": {"a": 1, "b": 2}}', 1),
                          ('{"name": "add", "arguments": {"a": "one"}}', 0)):
        p = ToolCallParser("hermes", tools, valid)
        p.feed(answer)
        p.finish()
        assert len(p.calls) == calls


@pytest.mark.model
def test_hermes_auto_holds_one_call_when_parallel_is_off(tok, compiler):
    from ostinato.structured.tools import ToolPlan, check_tools
    call = CALL_TEXTS["hermes"][0]
    one = ToolPlan("hermes", check_tools(WEATHER), WEATHER, "auto", parallel=False)
    many = ToolPlan("hermes", check_tools(WEATHER), WEATHER, "auto")
    for plan, two_ok in ((one, False), (many, True)):
        grammar = plan.grammar(lambda text: None)
        assert _accepts(tok, compiler, grammar, "No tool needed.")
        assert _accepts(tok, compiler, grammar, "Sure. " + call)
        assert _accepts(tok, compiler, grammar, f"{call}\n{call}") == two_ok


def test_template_families():
    from ostinato.structured.tools import family_of
    assert family_of("{% for m in messages %}<tool_call>{% endfor %}") == "hermes"
    assert family_of("[TOOL_CALLS]") == "mistral" and family_of("<|python_tag|>") == "llama3"
    assert family_of("[TOOL_CALLS]{{ name }}[ARGS]{{ args }}") == "mistral_args"
    assert family_of(None) == "generic"


@pytest.mark.model
def test_required_tool_choice_holds_a_real_answer(smollm_llm):
    """The generic form on SmolLM2 (no tool tokens): "required" held by the grammar gives
    calls that parse and whose arguments validate against the tool's schema."""
    from ostinato.structured.toolparse import parse_tool_calls
    from ostinato.structured.tools import ToolPlan, check_tools
    tools = check_tools(WEATHER)
    grammar = ToolPlan("generic", tools, WEATHER, "required").grammar(lambda text: None)
    q = [{"role": "user", "content": "What is the weather in Paris? Call get_weather."}]
    out = smollm_llm.chat(q, SamplingParams(temperature=0, max_tokens=80,
                                            structured_outputs={"grammar": grammar}))[0].outputs[0]
    content, calls = parse_tool_calls(out.text, "generic")
    assert content is None and calls and out.finish_reason == "stop"
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), tools[c.name])


@pytest.fixture(scope="module")
def qwen_llm():
    """Qwen2.5-Coder-0.5B (`make test` pulls it; a missing file fails in CI, as conftest's)."""
    import os

    from ostinato import LLM
    from ostinato.hub import EMBEDDED, home
    path = home() / EMBEDDED["qwen2.5-coder-0.5b-instruct"].filename
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI: `make test` should have pulled it")
        pytest.skip(f"{path} is missing: run `ostinato pull qwen2.5-coder-0.5b-instruct`")
    return LLM(path, max_model_len=1024)


@pytest.mark.model
def test_qwen_answer_already_valid_is_unchanged(qwen_llm):
    """Qwen2.5-Coder answers this prompt with the JSON alone: held to the schema, the answer
    is the same tokens to the end-of-turn token."""
    free = qwen_llm.chat(ALICE, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    jsonschema.validate(json.loads(free.text), PERSON)
    held = qwen_llm.chat(ALICE, SamplingParams(temperature=0, max_tokens=40,
                                               structured_outputs={"json": PERSON}))[0].outputs[0]
    assert held.token_ids == free.token_ids and held.finish_reason == free.finish_reason == "stop"


def test_the_deep_stack_pool_runs_jobs_on_at_most_its_workers_and_then_lets_them_go():
    from ostinato.structured.compiler import DeepStackPool

    pool = DeepStackPool(2, 64 << 20, "test-deep-stack")
    gate, seen, lock = threading.Event(), set(), threading.Lock()
    running = [0, 0]                    # now, most at once

    def job(k):
        with lock:
            running[0] += 1
            running[1] = max(running)
            seen.add(threading.current_thread().name)
        gate.wait(5)
        with lock:
            running[0] -= 1
        if k == 3:
            raise ValueError("job 3")
        return k * k

    futures = [pool.submit(job, k) for k in range(6)]
    for _ in range(250):                # two jobs start and wait; a third would be a bug
        if running[1] >= 2:
            break
        threading.Event().wait(0.02)
    threading.Event().wait(0.1)
    gate.set()
    assert [f.result(5) for f in futures if f is not futures[3]] == [0, 1, 4, 16, 25]
    with pytest.raises(ValueError, match="job 3"):
        futures[3].result(5)
    assert running[1] == 2 and seen == {"test-deep-stack"}
    for _ in range(100):                # the workers end once the queue is empty
        if not any(t.name == "test-deep-stack" for t in threading.enumerate()):
            break
        threading.Event().wait(0.02)
    assert not any(t.name == "test-deep-stack" for t in threading.enumerate())
