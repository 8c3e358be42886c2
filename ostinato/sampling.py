"""Sampling parameters, per-sequence logits processing, and token sampling.

Everything here works on ONE sequence at a time: `logits` is a 1-D fp32 tensor of
shape [vocab]. Keeping the maths per row means a request's result never depends on
which other requests share its batch (no batch-wide reductions, no shared RNG).

Processing order (`process_logits`), chosen to match vLLM's penalties and HF's
warper order:
    logit_bias -> repetition_penalty -> frequency/presence -> min_tokens (mask EOS)
    -> temperature -> top_k -> top_p -> min_p
Filtered tokens are set to -inf (HF's default `filter_value`), so softmax gives them
probability exactly 0 and they can never be drawn.

Known semantic choices:
  * Greedy (temperature == 0 or top_k == 1) skips temperature and the truncation
    warpers: they never change the argmax.
  * min_p comes after top_k/top_p (HF order); vLLM v1 applies min_p before them.
  * top_p always keeps the most probable token (HF's min_tokens_to_keep=1, vLLM too).
  * top_k keeps every token tied with the k-th largest logit (HF and vLLM do the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

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

    def __post_init__(self) -> None:
        self._check_floats()
        self._check_ints()
        self._check_logprobs()
        self._check_bools()
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
            if self.max_tokens == 0 and self.prompt_logprobs is None:
                raise _bad("max_tokens", 0, "0 is only meaningful with prompt_logprobs set")
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

    def _check_bools(self) -> None:
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be a bool")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (no randomness is drawn)."""
        return self.temperature == 0.0 or self.top_k == 1


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
    return list(ids)


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability, as in vLLM. rank is 1-based (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# ----------------------------------------------------------------- logits processing
# Each function takes a 1-D logits tensor [vocab] and returns a new tensor; the input
# is never modified (the caller keeps the raw logits for logprobs).

def _id_tensor(ids: Iterable[int] | torch.Tensor, vocab: int, what: str,
               device: torch.device) -> torch.Tensor:
    """Token ids as an int64 tensor on `device`, checked to lie inside [0, vocab)."""
    t = torch.as_tensor(ids if isinstance(ids, torch.Tensor) else list(ids),
                        dtype=torch.long, device=device).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"{what}: token ids must be in [0, {vocab}), got "
                         f"min={int(t.min())} max={int(t.max())}")
    return t


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> torch.Tensor:
    """logits[t] += bias[t] (the bias rounded to fp32 first, like HF's bias vector)."""
    if not bias:
        return logits
    ids = _id_tensor(bias.keys(), logits.shape[-1], "logit_bias", logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.clone().index_add_(0, ids, values)   # dict keys are unique


def apply_repetition_penalty(logits: torch.Tensor, token_ids: Iterable[int] | torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token seen (prompt + output), once per distinct token.

    Positive logits are divided by `penalty`, negative ones multiplied, so penalty > 1
    always makes a seen token less likely.
    """
    if penalty == 1.0:
        return logits
    ids = _id_tensor(token_ids, logits.shape[-1], "repetition_penalty", logits.device)
    if ids.numel() == 0:
        return logits
    ids = torch.unique(ids)
    seen = logits[ids]
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    out = logits.clone()
    out[ids] = penalised
    return out


def apply_frequency_presence_penalties(logits: torch.Tensor,
                                       output_ids: Iterable[int] | torch.Tensor,
                                       frequency_penalty: float,
                                       presence_penalty: float) -> torch.Tensor:
    """OpenAI semantics over OUTPUT tokens only:
    logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)."""
    if frequency_penalty == 0.0 and presence_penalty == 0.0:
        return logits
    vocab = logits.shape[-1]
    ids = _id_tensor(output_ids, vocab, "frequency/presence penalty", logits.device)
    if ids.numel() == 0:
        return logits
    counts = torch.bincount(ids, minlength=vocab).to(logits.dtype)   # [vocab]
    present = (counts > 0).to(logits.dtype)
    return logits - (frequency_penalty * counts + presence_penalty * present)


def apply_min_tokens(logits: torch.Tensor, num_output: int, min_tokens: int,
                     stop_ids: Iterable[int]) -> torch.Tensor:
    """Forbid the stop/EOS tokens while fewer than min_tokens tokens were generated."""
    if num_output >= min_tokens:
        return logits
    ids = _id_tensor(stop_ids, logits.shape[-1], "min_tokens stop ids", logits.device)
    if ids.numel() == 0:
        return logits
    out = logits.clone()
    out[ids] = NEG_INF
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature; temperature 0 is greedy and must be handled by the caller."""
    if temperature <= 0:
        raise ValueError(f"apply_temperature: temperature={temperature!r} must be > 0 "
                         "(temperature 0 means greedy: take the argmax instead)")
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits (plus any tied with the k-th); top_k <= 0 is off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth_largest, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass >= top_p.

    Works from the least likely token up: a token is dropped while the cumulative
    probability of it and everything less likely is <= 1 - top_p. The most likely
    token is always kept.
    """
    if top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, descending=False)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)      # [vocab], non-decreasing
    drop_sorted = tail_mass <= 1.0 - top_p
    drop_sorted[-1] = False                                    # keep the top token
    drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p * (probability of the top token)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max()
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   prompt_ids: Sequence[int] | torch.Tensor,
                   output_ids: Sequence[int] | torch.Tensor,
                   eos_ids: Iterable[int] = ()) -> torch.Tensor:
    """All of `params`' logits transformations for one sequence; returns a new [vocab] fp32
    tensor (the input is left untouched). `eos_ids` (and params.stop_token_ids) are
    masked while len(output_ids) < params.min_tokens."""
    if logits.dim() != 1:
        raise ValueError(f"process_logits: expected 1-D logits [vocab], got shape {tuple(logits.shape)}")
    x = logits.float()
    x = apply_logit_bias(x, params.logit_bias)
    if params.repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, _concat_ids(prompt_ids, output_ids), params.repetition_penalty)
    x = apply_frequency_presence_penalties(x, output_ids, params.frequency_penalty,
                                           params.presence_penalty)
    if params.min_tokens > 0:
        stop_ids = list(eos_ids) + list(params.stop_token_ids or [])
        x = apply_min_tokens(x, len(output_ids), params.min_tokens, stop_ids)
    if params.greedy:
        return x if x is not logits else x.clone()
    x = apply_temperature(x, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    x = apply_min_p(x, params.min_p)
    return x if x is not logits else x.clone()


def _as_cpu_ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).long().cpu()
    return torch.tensor(list(ids), dtype=torch.long)


def _concat_ids(a: Sequence[int] | torch.Tensor, b: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """prompt + output ids as one int64 CPU tensor [len(a) + len(b)]."""
    return torch.cat([_as_cpu_ids(a), _as_cpu_ids(b)])


# ----------------------------------------------------------------------- sampling

def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A request's own RNG: seeded from `seed`, or from fresh OS entropy when None.
    Streams differ between CPU and CUDA generators, so a seed reproduces on one device type."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> int:
    """Draw one token id from PROCESSED logits [vocab] (see process_logits).

    Greedy params: argmax (ties -> lowest id, torch.argmax's rule). Otherwise draw from
    softmax(logits) with the exponential-race trick using the request's own generator.
    Pass the same generator for every step of a request; with generator=None a new one
    is made from params.seed on each call.
    """
    if logits.dim() != 1:
        raise ValueError(f"sample: expected 1-D logits [vocab], got shape {tuple(logits.shape)}")
    if params.greedy:
        return int(torch.argmax(logits))
    if generator is None:
        generator = make_generator(params.seed, device=logits.device)
    return random_sample(logits, generator)


def random_sample(logits: torch.Tensor, generator: torch.Generator) -> int:
    """Sample from softmax(logits): argmax(p / E) with E ~ Exponential(1) i.i.d.

    P(argmax = i) = p_i because E_i / p_i ~ Exponential(rate p_i) and the smallest of
    independent exponentials is i with probability p_i / sum(p). Always draws exactly
    `vocab` numbers from `generator`, so a request's stream does not depend on others.
    Tokens with probability 0 (logit -inf) are never chosen while any p_i > 0.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    noise = torch.empty(probs.shape, dtype=torch.float32, device=generator.device)
    noise.exponential_(generator=generator)
    # exponential_ may return exactly 0; clamp so p / E stays finite (0 / tiny = 0).
    noise = noise.clamp_min_(torch.finfo(torch.float32).tiny).to(probs.device)
    token = int(torch.argmax(probs / noise))
    if not probs[token] > 0:   # also catches NaN from all -inf / NaN logits
        raise ValueError("sample: no token has a finite logit (everything was masked)")
    return token


def top_logprobs(logits_raw: torch.Tensor, k: int, token_id: int) -> dict[int, Logprob]:
    """Log-probabilities of the k most likely tokens plus `token_id`, from RAW logits.

    Returns {token: Logprob(logprob, rank, None)}, the chosen token first. Ranks are
    1-based: the top-k get 1..k in order; the chosen token gets 1 + the number of
    tokens strictly more likely than it. decoded_token is filled in by the caller.
    """
    if logits_raw.dim() != 1:
        raise ValueError(f"top_logprobs: expected 1-D logits [vocab], got shape {tuple(logits_raw.shape)}")
    vocab = logits_raw.shape[-1]
    if not 0 <= k <= vocab:
        raise ValueError(f"top_logprobs: k={k} must be in [0, {vocab}]")
    if not 0 <= token_id < vocab:
        raise ValueError(f"top_logprobs: token_id={token_id} must be in [0, {vocab})")
    logprobs = torch.log_softmax(logits_raw.float(), dim=-1)
    chosen = logprobs[token_id]
    chosen_rank = int((logprobs > chosen).sum()) + 1
    out = {token_id: Logprob(float(chosen), chosen_rank, None)}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        for rank, (value, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            if tid != token_id:
                out[tid] = Logprob(value, rank, None)
    return out
