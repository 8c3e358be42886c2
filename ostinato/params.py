"""SamplingParams and Logprob: plain data, no torch, so the scheduler and the server's
request parsing can use them without loading the engine."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

NEG_INF = float("-inf")
MAX_LOGPROBS = 20          # OpenAI's limit for logprobs / top_logprobs
MAX_LOGIT_BIAS = 100.0     # OpenAI's limit for |logit_bias value|
MAX_PENALTY = 2.0          # OpenAI's limit for |presence/frequency penalty|


# --------------------------------------------------------------------------- params

def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad(name: str, value: object, why: str) -> ValueError:
    return ValueError(f"SamplingParams.{name}={value!r}: {why}")


@dataclass
class SamplingParams:
    """Per-request sampling settings; names and defaults follow vLLM's SamplingParams."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: off (normalised to 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None            # normalised to list[str]
    stop_token_ids: list[int] | None = None        # normalised to list[int]
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # embed the prompt instead: its final hidden states pooled ("mean" or "last") and
    # L2-normalised, in the finished sequence's `embedding`; asks for max_tokens 0
    pooling: str | None = None
    # constrain the output to a JSON schema, regex, choice or grammar (a dict of the same
    # keys is accepted); the request ends when the grammar is complete
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_floats()
        self._check_ints()
        self._check_logprobs()
        self._check_bools()
        self._check_pooling()
        self._check_structured()
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_token_ids("stop_token_ids", self.stop_token_ids)

    def _check_floats(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                raise _bad(name, value, "must be a number")
            if math.isnan(value):
                raise _bad(name, value, "must not be NaN")
            setattr(self, name, float(value))
        if self.temperature < 0:
            raise _bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 means off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise _bad(name, value, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")

    def _check_ints(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise _bad(name, getattr(self, name), "must be an int")
        for name in ("max_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise _bad(name, value, "must be an int or None")
        if self.n < 1:
            raise _bad("n", self.n, "must be >= 1")
        if self.top_k < -1:
            raise _bad("top_k", self.top_k, "must be >= -1 (0 or -1 means off)")
        if self.top_k == -1:
            self.top_k = 0
        if self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "must be >= 0")
        if self.max_tokens is not None:
            if self.max_tokens < 0:
                raise _bad("max_tokens", self.max_tokens, "must be >= 0")
            if self.max_tokens == 0 and self.prompt_logprobs is None and self.pooling is None:
                raise _bad("max_tokens", 0, "0 is only meaningful with prompt_logprobs or "
                           "pooling set")
            if self.min_tokens > self.max_tokens:
                raise _bad("min_tokens", self.min_tokens,
                           f"must be <= max_tokens ({self.max_tokens})")

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value):
                raise _bad(name, value, "must be an int or None")
            if not 0 <= value <= MAX_LOGPROBS:
                raise _bad(name, value, f"must be in [0, {MAX_LOGPROBS}]")

    def _check_pooling(self) -> None:
        if self.pooling not in (None, "mean", "last"):
            raise _bad("pooling", self.pooling, "must be 'mean', 'last' or None")
        if self.pooling is not None and self.max_tokens != 0:
            raise _bad("max_tokens", self.max_tokens, "must be 0 with pooling (nothing is "
                       "generated)")

    def _check_structured(self) -> None:
        so = self.structured_outputs
        if isinstance(so, dict):
            try:
                so = self.structured_outputs = StructuredOutputsParams(**so)
            except TypeError as e:      # an unknown key
                raise _bad("structured_outputs", so, str(e).split(".__init__() ")[-1]) from None
        if so is None:
            return
        if not isinstance(so, StructuredOutputsParams):
            raise _bad("structured_outputs", so, "must be a StructuredOutputsParams, a dict "
                       "of its fields, or None")
        # the grammar decides where the output ends: these would fight it
        for name, off in (("ignore_eos", False), ("min_tokens", 0), ("pooling", None)):
            if getattr(self, name) != off:
                raise _bad(name, getattr(self, name), "cannot be combined with "
                           "structured_outputs (the grammar decides where the output ends)")

    def _check_bools(self) -> None:
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be a bool")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (no randomness is drawn)."""
        return self.temperature == 0.0 or self.top_k == 1


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint on the output, as vLLM's StructuredOutputsParams: `json` a JSON schema
    (dict, bool or its JSON text), `regex` a regular expression (Rust regex syntax, no
    look-around), `choice` one of these strings exactly, `grammar` a Lark grammar
    (llguidance's dialect) or a GBNF one (llama.cpp's), `json_object` any JSON object.
    Exactly one must be set."""

    json: dict | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)
                 or (k == "json" and self.json is False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: exactly one of {', '.join(STRUCTURED_KINDS)}"
                             f" must be set, got {len(given)}"
                             + (f" ({', '.join(given)})" if given else ""))
        self._check_types()
        if isinstance(self.choice, (list, tuple)):
            object.__setattr__(self, "choice", list(self.choice))

    def _check_types(self) -> None:
        kind, value = self.kind, self.value
        ok = {"json": lambda v: isinstance(v, (dict, bool, str)),
              "regex": lambda v: isinstance(v, str) and v != "",
              "choice": lambda v: isinstance(v, (list, tuple)) and len(v) > 0
              and all(isinstance(c, str) and c for c in v),
              "grammar": lambda v: isinstance(v, str) and v.strip() != "",
              "json_object": lambda v: v is True}[kind]
        if not ok(value):
            need = {"json": "a JSON schema (object, boolean or its JSON text)",
                    "regex": "a non-empty string", "choice": "a non-empty list of non-empty "
                    "strings", "grammar": "a non-empty string", "json_object": "true"}[kind]
            raise ValueError(f"structured_outputs: {kind} must be {need}")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)
                    or (k == "json" and self.json is False))

    @property
    def value(self):
        return getattr(self, self.kind)

    def key(self) -> str:
        """A canonical text of the constraint (what a compiled grammar is cached under)."""
        return json.dumps([self.kind, self.value], sort_keys=True, ensure_ascii=False)


def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
    """Keys may be ints or decimal strings (JSON object keys are strings); values floats."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("logit_bias", bias, "must be a dict {token_id: bias} or None")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.isdecimal():
            token = int(key)
        elif _is_int(key):
            token = key
        else:
            raise _bad("logit_bias", bias, f"key {key!r} is not a token id")
        if token < 0:
            raise _bad("logit_bias", bias, f"token id {token} is negative")
        if not _is_number(value) or math.isnan(value):
            raise _bad("logit_bias", bias, f"value {value!r} for token {token} is not a number")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise _bad("logit_bias", bias, f"value {value!r} for token {token} "
                       f"is outside [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        out[token] = float(value)
    return out


def _normalise_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", stop, "must be a str, a list of str, or None")
    if any(s == "" for s in items):
        raise _bad("stop", stop, "stop strings must not be empty")
    return list(items)


def _normalise_token_ids(name: str, ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
        raise _bad(name, ids, "must be a list of non-negative ints or None")
    return list(dict.fromkeys(ids))     # each once: a list of 2M repeats is scanned per token


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability, as in vLLM. rank is 1-based (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# ----------------------------------------------------------------- logits processing
# Each function takes a 1-D logits tensor [vocab] and returns a new tensor; the input
# is never modified (the caller keeps the raw logits for logprobs).
