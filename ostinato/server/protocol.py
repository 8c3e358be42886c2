"""OpenAI request bodies (pydantic) and their conversion to SamplingParams.

Every field is honoured or refused: a field outside the schema is a 400 naming it
(`extra="forbid"`), and a field of OpenAI's schema that this server does not implement is
a 400 naming it unless its value asks for nothing (`tools: []`, `response_format:
{"type": "text"}`, ...): see REFUSED. Every invalid value becomes an APIError(400) in
OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..params import StructuredOutputsParams
from ..structured.tools import ToolPlan, check_tool_choice, check_tools, family_of
from ..sampling import MAX_LOGPROBS, SamplingParams

INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_N = 128                         # OpenAI's limit for n
MIN_DIVISOR = 1e-6                  # smallest temperature / repetition_penalty (logits / it)


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    # OpenAI's error types: every client error is an invalid request, 401 included (OpenAI
    # answers a wrong key so, with code "invalid_api_key"); 5xx are server errors
    TYPES: ClassVar[dict[int, str]] = {401: "invalid_request_error",
                                       429: "rate_limit_exceeded"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code
        self.type = type_ or self.TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


@dataclass
class Limits:
    """What one request (and all of them together) may ask; every one is a serve flag.
    Over a limit: 413 for the body, 503 for the queue and the streams (retry later), 400
    for the rest, each naming its flag."""
    max_queued_requests: int = 256      # prompts waiting to start (--max-queued-requests)
    max_body_bytes: int = 16 << 20      # --max-body-mb
    max_prompt_tokens: int | None = None    # per prompt; None: the model's context
    max_tokens: int | None = None       # per choice; None: what the context leaves
    max_n: int = 16                     # choices per prompt
    max_prompts: int = 64               # prompts in one completions request
    max_logprobs: int = MAX_LOGPROBS    # logprobs / top_logprobs
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_concurrent_streams: int = 256   # open SSE responses


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_sampling_error(e: ValueError) -> APIError:
    """SamplingParams says 'SamplingParams.top_p=2.0: must be in (0, 1]'; name the field."""
    m = re.match(r"SamplingParams\.(\w+)=", str(e))
    return bad_request(str(e).removeprefix("SamplingParams."), m.group(1) if m else None)


MAX_JSON_DEPTH = 64        # nesting of a request body: schemas and tool parameters fit well
MAX_NUMBER_CHARS = 64      # a JSON number's text: int64 and any double fit well
MAX_JSON_CONTAINERS = 1 << 18    # arrays and objects in a body: a long agent history
                                 # holds thousands; millions take seconds to validate
# bytes.translate tables: a number's characters to "1", every other byte to " "; digits
# to "d", "eE" to "e", "+-" to "s", every other byte to " "; every byte but '"[]{}' deleted
_NUMBER_MASK = bytes(ord("1") if chr(c) in "0123456789.eE+-" else ord(" ") for c in range(256))
_EXPONENT_MASK = bytes(ord("d") if chr(c) in "0123456789" else ord("e") if chr(c) in "eE" else
                       ord("s") if chr(c) in "+-" else ord(" ") for c in range(256))
_NOT_SKELETON = bytes(c for c in range(256) if c not in b'"[]{}')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_CESU_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


class _BadNumber(ValueError):
    pass


def _short_number(text: str) -> str:
    """Python refuses ints of over 4300 digits with a bare ValueError: refuse long numbers
    first, whatever their kind."""
    if len(text) > MAX_NUMBER_CHARS:
        raise _BadNumber(f"the number {text[:20]}... has {len(text)} characters, over "
                         f"{MAX_NUMBER_CHARS}")
    return text


def _bounded_int(text: str) -> int:
    return int(_short_number(text))


def _finite_float(text: str) -> float:
    value = float(_short_number(text))
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text} is out of a double's range")
    return value


def _no_constant(name: str):
    raise _BadNumber(f"{name} is not a JSON value")


def _load_json(raw: bytes, encoding: str):
    """Strict, bounded JSON: no NaN/Infinity, no overflowing or over-long numbers.

    A Python call per number costs seconds on a body of millions of them, so the per-number
    checks run only where a number could fail them: where a run of over MAX_NUMBER_CHARS
    number characters or a three-digit exponent is in the body (in a string or not), or
    the body is not UTF-8. Elsewhere json's C parser reads the numbers: none is long, and
    none overflows a double."""
    exponents = raw.translate(_EXPONENT_MASK)      # 1e999 overflows a double; 1e99 cannot
    if encoding in _UTF8 and b"eddd" not in exponents and b"esddd" not in exponents and \
            b"1" * (MAX_NUMBER_CHARS + 1) not in raw.translate(_NUMBER_MASK):
        return _PLAIN.decode(raw.decode(encoding, "surrogatepass"))
    return json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float,
                      parse_constant=_no_constant)


_PLAIN = json.JSONDecoder(parse_constant=_no_constant)   # made once: ~20 us a request
_UTF8 = ("utf-8", "utf-8-sig")


def _nesting(text: bytes) -> tuple[int, int]:
    """(depth, count) of the arrays and objects of JSON text, at C speed and before it is
    parsed: its escapes cut out, its quotes and brackets kept, a bracket counted where an
    even number of quotes lies before it (outside strings); the depth is the peak of the
    running sum of +1 per opening, -1 per closing. On text that is not JSON: a figure."""
    text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    chars = np.frombuffer(text.translate(None, _NOT_SKELETON), dtype=np.uint8)
    if not chars.size:
        return 0, 0
    outside = (np.cumsum(chars == ord('"'), dtype=np.int32) & 1) == 0
    opens = ((chars == ord("[")) | (chars == ord("{"))) & outside
    closes = ((chars == ord("]")) | (chars == ord("}"))) & outside
    depth = np.cumsum(opens.astype(np.int32) - closes.astype(np.int32), dtype=np.int32)
    return int(depth.max()), int(opens.sum())


def _has_lone_surrogate(data) -> bool:
    """A lone UTF-16 surrogate in a string or key has no UTF-8 form (json pairs the
    escapes of a surrogate pair into one character)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def load_bounded(raw: bytes | str, what: str = "the request body",
                 param: str | None = None):
    """raw read as strict, bounded JSON (numbers, nesting, size, strings); a 400 naming
    `what` when it is not. No Python work per value: a body of millions of them costs about
    what json's C parser does."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")     # a lone surrogate: not valid JSON
    encoding = json.detect_encoding(raw)
    utf8 = encoding in _UTF8
    try:
        text = raw if utf8 else raw.decode(encoding).encode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise bad_request(f"{what} is not valid JSON: {e}", param) from None
    # no more brackets in all than the limits allow (strings' included): nothing to count
    few = text.count(b"[") + text.count(b"{") <= MAX_JSON_DEPTH
    depth, count = (0, 0) if few else _nesting(text)
    if depth > MAX_JSON_DEPTH:
        raise bad_request(f"{what} nests arrays and objects deeper than {MAX_JSON_DEPTH} "
                          "levels", param)
    if count > MAX_JSON_CONTAINERS:
        raise bad_request(f"{what} holds {count} arrays and objects, over "
                          f"{MAX_JSON_CONTAINERS}", param)
    try:
        data = _load_json(raw, encoding)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # JSONDecodeError, _BadNumber
        raise bad_request(f"{what} is not valid JSON: {e}", param) from None
    # a UTF-8 body holds a lone surrogate as an escape, or as CESU-8 bytes (ED A0-BF: json
    # decodes with surrogatepass)
    escape = b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None
    cesu = b"\xed" in raw and _CESU_SURROGATE.search(raw) is not None
    if (not utf8 or escape or cesu) and _has_lone_surrogate(data):
        raise bad_request(f"{what} has a lone UTF-16 surrogate (\\ud800-\\udfff) in a "
                          "string; it is not valid Unicode", param)
    return data


OFF_LOOP_BYTES = 256 << 10     # a body this size or larger is parsed on a worker thread


async def parse_request(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """parse_body; a large body on a worker thread, so that its parse (up to a second for
    --max-body-mb of small values) does not hold the event loop, and every other stream's
    tokens, while it runs."""
    if len(raw) < OFF_LOOP_BYTES:
        return parse_body(raw, model)
    return await asyncio.to_thread(parse_body, raw, model)


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    data = load_bounded(raw)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    if getattr(model, "OPENAI", False):
        check_refused(data)
        data = {k: v for k, v in data.items() if k not in REFUSED}   # all ask for nothing
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def from_validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"])     # e.g. "stop.str" for a union member
    more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "this server does not implement this field; remove it"
    return bad_request(f"{where}: {msg}{more}", str(first["loc"][0]) if first["loc"] else None)


def _nothing(v) -> bool:
    return v is None or v == [] or v == {} or v is False


# OpenAI fields this server does not implement -> (values that ask for nothing, what the
# field would need). Any other value is refused with a 400 naming the field.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "audio": (_nothing, "audio output"),
    "modalities": (lambda v: _nothing(v) or v == ["text"], "output other than text"),
    "functions": (_nothing, "function calling"),
    "function_call": (lambda v: v in (None, "none"), "function calling"),
    "prediction": (_nothing, "predicted outputs"),
    "reasoning_effort": (lambda v: v is None, "a reasoning model"),
    "verbosity": (lambda v: v is None, "a reasoning model"),
    "web_search_options": (_nothing, "web search"),
    "store": (_nothing, "stored completions"),
    "metadata": (_nothing, "stored completions"),
    "moderation": (_nothing, "moderation"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "service tiers"),
    "prompt_cache_options": (_nothing, "explicit prompt-cache breakpoints and lifetimes "
                             "(the prefix cache here is automatic)"),
    "prompt_cache_retention": (lambda v: v in (None, "in_memory"),
                               "a 24-hour prompt cache (the prefix cache here is in memory)"),
    "suffix": (lambda v: v is None or v == "", "fill-in-the-middle"),
    "chat_template": (lambda v: v is None, "per-request chat templates (a template is code "
                      "run on the server; the model's own is used)"),
}


def check_refused(data: dict) -> None:
    """400 for the first field of REFUSED whose value asks for something."""
    for name, (harmless, needs) in REFUSED.items():
        if name in data and not harmless(data[name]):
            raise bad_request(f"{name}: this server does not implement {needs}; got "
                              f"{_short(data[name])}", name)


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _over(what: str, value: int, limit: int, flag: str, param: str) -> APIError:
    return bad_request(f"{what} is {value}, over this server's limit of {limit} ({flag})", param)


def check_limits(req: _Sampling, limits: Limits) -> None:
    """The per-request limits that the body alone decides (tokens are checked later)."""
    if req.n > limits.max_n:
        raise _over("n", req.n, limits.max_n, "--max-n", "n")
    if isinstance(req, CompletionRequest) and req.candidates > limits.max_n:
        raise _over("best_of", req.candidates, limits.max_n, "--max-n", "best_of")
    k = req.requested_logprobs() if isinstance(req, ChatCompletionRequest) else req.logprobs
    if k is not None and k > limits.max_logprobs:
        raise _over("logprobs", k, limits.max_logprobs, "--max-logprobs",
                    "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > limits.max_stop_strings:
        raise _over("the number of stop strings", len(stops), limits.max_stop_strings,
                    "--max-stop-strings", "stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_string_chars:
        raise _over("the longest stop string's length", longest, limits.max_stop_string_chars,
                    "--max-stop-string-chars", "stop")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if limits.max_tokens is not None and asked is not None and asked > limits.max_tokens:
        raise _over("max_tokens", asked, limits.max_tokens, "--max-tokens-limit", "max_tokens")
    if isinstance(req, CompletionRequest) and len(req.prompt_list()) > limits.max_prompts:
        raise _over("the number of prompts", len(req.prompt_list()), limits.max_prompts,
                    "--max-prompts", "prompt")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, v):
        if v:       # random padding fields on each chunk: nothing to hide on a local server
            raise bad_request("stream_options.include_obfuscation: this server does not add "
                              "obfuscation padding; leave it unset or false", "stream_options")
        return v


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint. grammar: Lark (llguidance's
    dialect) or GBNF (llama.cpp's, told apart by its `::=` rules)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def set_fields(self) -> dict:
        return {("json" if k == "json_" else k): v
                for k, v in self.model_dump(exclude_none=True).items()
                if not (k == "json_object" and v is False)}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")    # OpenAI's rule for the name
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None      # enforced either way: every token is masked


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise bad_request("response_format: json_schema is required with type "
                              "'json_schema' and allowed only with it", "response_format")
        return self

    def constraint(self) -> dict:
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":      # no schema: any JSON, as OpenAI
            schema = self.json_schema.schema_
            return {"json": {} if schema is None else schema}
        return {}


class _OpenAIRequest(BaseModel):
    """Unknown fields are refused (400 naming them); REFUSED fields are checked first."""
    model_config = ConfigDict(extra="forbid")
    OPENAI: ClassVar[bool] = True
    model: str | None = None
    # identify the end user to the operator; by definition they never change the output
    user: str | None = None
    safety_identifier: str | None = None


class _Sampling(_OpenAIRequest):
    """Fields shared by chat and completions; None means 'the default'."""
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, le=2.0)     # OpenAI's range is [0, 2]
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # a routing hint for OpenAI's machines; the prefix cache here needs no key
    prompt_cache_key: str | None = None
    # structured output (vLLM's fields; chat's response_format too): at most one constraint
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("temperature", "repetition_penalty")
    @classmethod
    def _computable(cls, v, info):
        """Logits are divided by these: a positive value too small to divide by overflows
        every logit (5e-324 leaves no finite one), so it is refused, not run."""
        if v is not None and 0 < v < MIN_DIVISOR:
            hint = "; use 0 for greedy decoding" if info.field_name == "temperature" else ""
            raise bad_request(f"{info.field_name}={v!r} is too small to divide logits by "
                              f"(at least {MIN_DIVISOR:g}){hint}", info.field_name)
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def constraints(self) -> dict[str, tuple[str, Any]]:
        """Field -> (kind, value) of every constraint the request asks for."""
        out = {f"structured_outputs.{k}": (k, v) for k, v in
               (self.structured_outputs.set_fields() if self.structured_outputs else {}).items()}
        for kind in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{kind}") is not None:
                out[f"guided_{kind}"] = (kind, getattr(self, f"guided_{kind}"))
        fmt = getattr(self, "response_format", None)
        for k, v in (fmt.constraint() if fmt else {}).items():
            out["response_format"] = (k, v)
        return out

    def structured(self) -> StructuredOutputsParams | None:
        found = self.constraints()
        if self.structured_outputs is not None and not self.structured_outputs.set_fields():
            raise bad_request("structured_outputs: exactly one of json, regex, choice, grammar, "
                              "json_object must be set, got none", "structured_outputs")
        if len(found) > 1:
            raise bad_request(f"one output constraint at a time, got {len(found)}: "
                              f"{', '.join(found)}", next(iter(found)).split(".")[0])
        if not found:
            return None
        field, (kind, value) = next(iter(found.items()))
        if kind == "json" and isinstance(value, str):   # a schema as JSON text: read as a body
            value = load_bounded(value, f"{field} (a schema as JSON text)", field.split(".")[0])
        try:
            return StructuredOutputsParams(**{kind: value})
        except ValueError as e:
            raise bad_request(f"{field}: {str(e).removeprefix('structured_outputs: ')}",
                              field.split(".")[0]) from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value
        try:
            return SamplingParams(
                n=self.n, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
                top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
                presence_penalty=pick(self.presence_penalty, 0.0),
                frequency_penalty=pick(self.frequency_penalty, 0.0),
                repetition_penalty=pick(self.repetition_penalty, 1.0),
                logit_bias=self.logit_bias, seed=self.seed, stop=self.stop,
                stop_token_ids=self.stop_token_ids, max_tokens=max_tokens,
                min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                structured_outputs=self.structured())
        except ValueError as e:
            raise from_sampling_error(e) from None

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids the runner would index with: refuse them here, not mid-step."""
        for key in self.logit_bias or {}:       # ASCII digits, few enough for int()
            if not (key.isascii() and key.isdecimal() and len(key) <= 20) \
                    or int(key) >= vocab_size:
                raise bad_request(f"logit_bias key {key[:30]!r} is not a token id in "
                                  f"[0, {vocab_size})", "logit_bias")
        for t in self.stop_token_ids or []:
            if not 0 <= t < vocab_size:
                raise bad_request(f"stop_token_ids: {t} is not in [0, {vocab_size})",
                                  "stop_token_ids")


class _ChatTemplate(BaseModel):
    """vLLM's chat-template fields (chat completions and /tokenize)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_way_to_end(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both be "
                              "true: the first opens a new assistant turn, the second continues "
                              "the last message; set add_generation_prompt to false",
                              "continue_final_message")
        return self

    def template_options(self) -> dict:
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "extra": self.chat_template_kwargs or {}}


class ChatCompletionRequest(_ChatTemplate, _Sampling):
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self, chat_template: str | None) -> ToolPlan | None:
        """The tools, the choice and the call format of this request (None: no tools and
        no tool choice); 400 naming a malformed tool, an unknown choice, or a constraint
        beside tools the output is read for."""
        plan = make_tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls,
                              chat_template)
        found = self.constraints()
        if plan is not None and plan.active and found:
            raise bad_request(f"{next(iter(found))} cannot be combined with tools unless "
                              "tool_choice is 'none': the output is held to the tool-call "
                              "format", next(iter(found)).split(".")[0])
        return plan

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def make_tool_plan(tools, tool_choice, parallel: bool | None,
                   chat_template: str | None) -> ToolPlan | None:
    """A request's tools and tool choice checked (400 naming the problem); None when it has
    neither."""
    tools = tools or None               # [] asks for nothing
    try:
        defs = check_tools(tools) if tools else {}
        choice = check_tool_choice(defs, tool_choice)
    except ValueError as e:
        raise bad_request(str(e), "tool_choice" if str(e).startswith("tool_choice")
                          else "tools") from None
    if not tools and choice == "none":
        return None
    return ToolPlan(family_of(chat_template), defs, list(tools or []), choice,
                    parallel is not False)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)       # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _best_of_fits(self):
        if self.best_of is not None:
            if self.best_of < self.n:
                raise bad_request(f"best_of ({self.best_of}) must be at least n ({self.n})",
                                  "best_of")
            if self.stream and self.best_of > self.n:
                raise bad_request("best_of cannot be used with stream: the best choices are "
                                  "known only at the end", "best_of")
        return self

    @property
    def candidates(self) -> int:
        """Choices generated per prompt (best_of), of which the n best are returned."""
        return self.best_of or self.n

    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class EmbeddingRequest(_OpenAIRequest):
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def input_list(self) -> list[str | list[int]]:
        p = self.input
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return [p]
        if not p:
            raise bad_request("input must not be empty", "input")
        return list(p)


class TokenizeRequest(_ChatTemplate):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None     # None: True for a prompt, False for messages
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None   # written by the template, as chat's

    def tool_plan(self, chat_template: str | None) -> ToolPlan | None:
        return make_tool_plan(self.tools, None, None, chat_template)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
