"""Constraint specs -> compiled grammars, off the engine thread, time-limited and cached."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, TimeoutError as FutureTimeout

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

from ..params import StructuredOutputsParams
from ..tokenizer import Tokenizer
from .constraint import Constraint
from .vocab import llg_tokenizer

log = logging.getLogger("ostinato.structured")

# Whitespace a JSON schema allows between two tokens of the JSON: at most one line break
# and 20 spaces or tabs of indentation (pretty-printing to depth 5), none before the value
# or after it, so a model cannot loop on newlines.
JSON_WHITESPACE = r"(?:\r?\n)?[ \t]{0,20}"
# lenient off: a schema keyword llguidance does not implement is an error, never ignored
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE, "lenient": False}
COMPILE_TIMEOUT_S = 5.0     # longer is a 400: the schema is too complex
# llguidance's compiler recurses once per link of a $ref or rule chain, some kilobytes a
# link: a 2,000-link chain overflowed a thread's default 8 MB stack, and the segfault took
# the whole server. Its own size limit ends a chain below 20,000 links; 256 MB of stack
# (address space, touched only as deep as a compile goes) held 100,000-link ones.
COMPILE_STACK_BYTES = 256 << 20
_MAX_ERROR_CHARS = 600


class GrammarError(ValueError):
    """The constraint cannot be compiled: invalid, unsupported or too complex."""


class Grammar:
    """A compiled constraint: the matcher in its initial state, copied per sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, compile_s: float):
        self._matcher, self.vocab_size, self.compile_s = matcher, vocab_size, compile_s

    def new_constraint(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """One per engine. compile() may be called from any thread; the vocabulary is built on
    first use (0.3-1 s) and compiled grammars are kept by their text (LRU)."""

    def __init__(self, tokenizer: Tokenizer, eos_ids, vocab_size: int,
                 timeout_s: float = COMPILE_TIMEOUT_S, cache_size: int = 64):
        self.tokenizer, self.eos_ids = tokenizer, sorted(eos_ids)
        self.vocab_size, self.timeout_s, self.cache_size = vocab_size, timeout_s, cache_size
        self._lock = threading.Lock()
        self._llg_tok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._pool = DeepStackPool(2, COMPILE_STACK_BYTES, "ostinato-grammar")

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._llg_tok is None:
                try:
                    self._llg_tok = llg_tokenizer(self.tokenizer, self.eos_ids, self.vocab_size)
                except ValueError as e:     # this model cannot be constrained: say why
                    raise GrammarError(f"structured output is not available: {e}") from None
            return self._llg_tok

    def cached(self, spec: StructuredOutputsParams) -> Grammar | None:
        with self._lock:
            g = self._cache.get(spec.key())
            if g is not None:
                self._cache.move_to_end(spec.key())
            return g

    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """The compiled grammar of `spec`; GrammarError when it is invalid, uses a feature
        llguidance does not implement, or takes longer than timeout_s to compile."""
        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        text = grammar_text(spec)           # bounded by MAX_GRAMMAR_CHARS
        tok = self.llg_tokenizer()          # once per model, not counted in the time limit
        t0 = time.perf_counter()
        future = self._pool.submit(_build, tok, text, spec.kind)
        try:
            matcher = future.result(timeout=self.timeout_s)
        except FutureTimeout:   # the worker runs on, bounded by llguidance's fuel limits
            raise GrammarError(f"{spec.kind}: compiling it took longer than "
                               f"{self.timeout_s:g} s; simplify it") from None
        grammar = Grammar(matcher, self.vocab_size, time.perf_counter() - t0)
        with self._lock:
            self._cache[spec.key()] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar


class DeepStackPool:
    """At most `workers` threads with a deep stack, started as jobs come and ending when
    none is left, so that the stack a deep compile touched (a 100,000-link chain: ~400 MB
    between the two) goes back to the system; submit() returns a concurrent.futures.Future,
    as an executor's does."""

    _stack_lock = threading.Lock()      # threading.stack_size is process-wide

    def __init__(self, workers: int, stack_bytes: int, name: str):
        self.workers, self.stack_bytes, self.name = workers, stack_bytes, name
        self._lock = threading.Lock()
        self._jobs: deque = deque()
        self._running = 0

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        with self._lock:
            self._jobs.append((future, fn, args))
            if self._running < self.workers:
                try:
                    self._start()
                    self._running += 1
                except RuntimeError as e:       # no thread at all: this job fails, not
                    if not self._running:       # every later one (a worker never started)
                        self._jobs.remove((future, fn, args))
                        future.set_exception(e)
        return future

    def _start(self) -> None:
        with self._stack_lock:
            previous = threading.stack_size(self.stack_bytes)
            try:
                threading.Thread(target=self._work, name=self.name, daemon=True).start()
                return
            except RuntimeError as e:   # no address space for it (ulimit -v): say so, go on
                log.warning("%s: no thread with a %d MB stack (%s); a default one instead: "
                            "a long $ref chain may overflow it", self.name,
                            self.stack_bytes >> 20, e)
            finally:
                threading.stack_size(previous)
            threading.Thread(target=self._work, name=self.name, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running -= 1
                    return
                future, fn, args = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:      # the caller's future.result() raises it
                    future.set_exception(e)


def _build(tok: llguidance.LLTokenizer, text: str, kind: str) -> llguidance.LLMatcher:
    matcher = llguidance.LLMatcher(tok, text, log_level=0)
    if matcher.is_error():
        raise GrammarError(f"{kind}: {_short(matcher.get_error())}")
    _check_first_token(matcher, kind)
    return matcher


def _check_first_token(matcher: llguidance.LLMatcher, kind: str) -> None:
    """A grammar that matches nothing (a schema whose only rule refers to itself) compiles,
    then fails at its first token: find that here, on a copy, so it is a GrammarError."""
    probe = matcher.deep_copy()
    mask = probe.compute_bitmask()
    if probe.is_error() or not any(mask):
        raise GrammarError(f"{kind}: no output can satisfy it (it allows no first token; "
                           "a $ref loop with no way out?)")


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for one constraint (not yet checked: _build does that)."""
    kind, value = spec.kind, spec.value
    if kind in ("json", "json_object"):
        return _json_grammar(value if kind == "json" else {"type": "object"})
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    if len(value) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"grammar: {len(value)} characters, over this server's limit of "
                           f"{MAX_GRAMMAR_CHARS}")
    try:        # Lark as it is; GBNF (a `::=` rule) converted to Lark
        lark = value if _is_lark(value) else gbnf_to_lark(value)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    except Exception as e:
        raise GrammarError(f"grammar: not a valid Lark or GBNF grammar: {_short(str(e))}") \
            from None


# GBNF's conversion to Lark is pure Python, run before the compile's time limit: about 2 us
# a character for a literal, and quadratic in a chain of rules; real grammars are a few KB
MAX_GRAMMAR_CHARS = 65_536
_LARK_START = re.compile(r"%llguidance\b|start\s*:")


def _is_lark(grammar: str) -> bool:
    """llguidance's any_to_lark test (a line that starts, after whitespace, with
    `%llguidance` or `start:`), in linear time: its multi-line `^\\s*` regex is quadratic
    in a run of blank lines (40,000: 19 s, the GIL held)."""
    at = 0
    for line in grammar.split("\n"):
        lead = len(line) - len(line.lstrip())
        if lead < len(line) and _LARK_START.match(grammar, at + lead):
            return True
        at += len(line) + 1
    return False


# The thought of a model that thinks (<think>...</think>) is free text: a constraint holds
# the answer after it. The thought ends at the first </think> (a lazy lexeme).
_THOUGHT = ('thought[lazy]: THOUGHT_TEXT "</think>"\nTHOUGHT_TEXT: /(.|\\n)*/\n'
            "THOUGHT_WS: /[ \\t\\r\\n]{0,4}/\n")


def after_thought(lark: str, in_thought: bool) -> str:
    """A Lark grammar (its top rule `start`) held only after the thought: the answer may
    open with <think>...</think> (or, in_thought, starts inside it and must close it)."""
    body = re.sub(r"^%llguidance \{\}\n", "", lark)
    body = re.sub(r"^start:", "answer:", body, count=1, flags=re.M)
    head = "thought THOUGHT_WS" if in_thought else '("<think>" thought THOUGHT_WS)?'
    return f"%llguidance {{}}\nstart: {head} answer\n{_THOUGHT}{body}"


def answer_lark(spec: StructuredOutputsParams) -> str | None:
    """The constraint as a Lark grammar whose top rule is `start` (for after_thought), or None
    for a grammar of the user's own (not rewritten)."""
    kind, value = spec.kind, spec.value
    if kind in ("json", "json_object"):
        schema = _checked_schema(value) if kind == "json" else {"type": "object"}
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        return "start: " + json_rule(schema)
    if kind == "choice":
        return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
    if kind == "regex":
        # a Lark regex ends at an unescaped "/": escape those (an escaped one stays as it is)
        # and keep it on one line
        body = re.sub(r"(?<!\\)((?:\\\\)*)/", r"\1\\/", value)
        return "start: /" + body.replace("\n", "\\n").replace("\r", "\\r") + "/"
    return None


# keywords whose value maps names to schemas, and those whose value is data, not a schema
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA = ("enum", "const", "default", "examples")


def compilable(schema):
    """The schema without `propertyNames: {"type": "string"}`, which every JSON object meets
    (its keys are strings) and llguidance does not compile (zod writes it for a record:
    Claude Code's tools carry it). Any other propertyNames is left for llguidance to
    refuse."""
    if isinstance(schema, list):
        return [compilable(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "propertyNames" and v == {"type": "string"}:
            continue
        if k in _NAMED_SCHEMAS and isinstance(v, dict):
            out[k] = {name: compilable(sub) for name, sub in v.items()}
        else:
            out[k] = v if k in _DATA else compilable(v)
    return out


def json_rule(schema: dict) -> str:
    """A JSON value held to `schema` inside a Lark grammar, with the server's whitespace."""
    return "%json " + json.dumps({**compilable(schema), "x-guidance": JSON_OPTIONS})


def _checked_schema(schema) -> dict | bool:
    """A request's schema (a dict, a boolean, or its JSON text) as a dict or a boolean;
    GrammarError for anything else, or for llguidance's own options in it."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:      # ValueError: JSONDecodeError, int()
            raise GrammarError(f"json: the schema is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"json: a schema is an object or a boolean, not "
                           f"{type(schema).__name__}")
    if isinstance(schema, dict) and "x-guidance" in schema:
        raise GrammarError("json: x-guidance (llguidance's own options) is not accepted: "
                           "the server sets the whitespace and strictness")
    return schema


def _json_grammar(schema) -> str:
    schema = compilable(_checked_schema(schema))
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"json: {_short(str(e))}") from None


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + "..."
