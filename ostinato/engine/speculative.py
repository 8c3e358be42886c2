"""Speculative decoding: tokens guessed cheaply, verified in one step. Pure Python, no torch.

After a step, each decoding sequence may get draft tokens (Sequence.draft_ids). The scheduler
treats them as more tokens to compute, so the next step computes the last sampled token and
the drafts together; the runner then samples position by position, exactly as plain decoding
would, and keeps going while the token it samples equals the draft there. The answer is
therefore the one plain decoding gives, bit for bit, greedy or sampled with a seed: every
emitted token is drawn from the same logits (the kernels give a position the same bits as 1
of 1 or 1 of k+1 rows) with the same generator draws (one per emitted token). For a sampled
token this is rejection sampling with a deterministic proposal: the draft x is kept with
probability p(x), and a rejected position's token follows p without x, renormalised.

Draft sources (SpeculativeConfig.method):
- "ngram": prompt lookup. The longest n-gram (sizes prompt_lookup_max down to
  prompt_lookup_min, doubling) that ends the sequence and occurred earlier in its prompt or
  output proposes the tokens that followed its latest occurrence. An index per sequence
  makes this a few dictionary reads per step.
- "suffix": the same, also over other requests' text (a bounded, shared n-gram table).
- "draft": a smaller model with the same vocabulary, run greedily (engine/draft_model.py).

How many tokens to draft (DraftLength): a draft token is worth computing when the chance that
it is kept exceeds its cost in the step, counted in the tokens the step emits. A sequence's
chance that its j-th draft is kept is alpha**j (alpha: its measured per-token acceptance); the
cost of one more token is its measured time in the step, counted in the tokens a plain decode
step of the same batch emits in that time (StepCost): near 0 for a step bound by its fixed
costs (batch 1 on a CPU: the weights' reads), near 1 for one bound by its tokens (many
streams), where only a near-certain guess pays. When guesses keep failing, alpha falls until no draft is worth it; a
sequence without drafts lets alpha drift back to the prior, and every PROBE_EVERY steps
without one it tries PROBE_TOKENS anyway, so a text that turns repetitive is found again.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

METHODS = ("ngram", "suffix", "draft")
PROBE_EVERY = 16        # decode steps without a draft before a short one is tried anyway
PROBE_TOKENS = 2


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 16   # the most draft tokens per sequence and step
    prompt_lookup_min: int = 2         # shortest n-gram matched (ngram, suffix)
    prompt_lookup_max: int = 16        # longest n-gram matched (sizes double from the shortest)
    draft_model: str | None = None     # method "draft": the model that guesses
    adaptive: bool = True              # draft length from measured acceptance and cost

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r}: choose one of {METHODS}")
        if not 1 <= self.num_speculative_tokens <= 64:
            raise ValueError(f"num_speculative_tokens {self.num_speculative_tokens}: 1..64")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 64:
            raise ValueError(f"prompt lookup n-gram sizes {self.prompt_lookup_min}.."
                             f"{self.prompt_lookup_max}: need 1 <= min <= max <= 64")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("a draft model goes with method 'draft', and only with it")

    @classmethod
    def parse(cls, spec: str | SpeculativeConfig | None, **kw) -> SpeculativeConfig | None:
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        return cls(method=spec, **{k: v for k, v in kw.items() if v is not None})


def lookup_sizes(n_min: int, n_max: int) -> list[int]:
    """The n-gram sizes looked up, longest first: n_min doubled up to n_max (and n_max).
    Code repeats itself in similar blocks: a long context picks the right copy, and
    doubling reaches it with a few index entries per token (2, 4, 8, 16 keep 11.1 tokens
    per step on the bench's code edit, 2..5 keep 8.8, 2..8 keep 9.9)."""
    sizes, n = {n_max}, n_min
    while n < n_max:
        sizes.add(n)
        n *= 2
    return sorted(sizes, reverse=True)


class NgramIndex:
    """One token list's n-grams (lookup_sizes) -> the end of their latest occurrence.
    Tokens are only appended (a sequence's prompt and output), so the index grows by the
    new positions at each call."""

    def __init__(self, n_min: int, n_max: int):
        self.sizes = lookup_sizes(n_min, n_max)             # longest match first
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0                                   # ends < indexed are in `ends`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest n-gram
        ending `tokens`; [] when none occurred."""
        n_tok = len(tokens)
        self._index(tokens, n_tok - 1)     # every n-gram but those ending at the last token
        for n in self.sizes:
            if n > n_tok:
                continue
            end = self.ends.get(tuple(tokens[n_tok - n:]))
            if end is not None:
                return tokens[end: min(end + k, n_tok)]
        return []

    def _index(self, tokens: list[int], upto: int) -> None:
        ends = self.ends
        for end in range(max(self.indexed, 1), upto + 1):
            for n in self.sizes:
                if n <= end:
                    ends[tuple(tokens[end - n: end])] = end
        self.indexed = max(self.indexed, upto + 1)


class SuffixTable:
    """N-grams of finished requests' tokens -> the tokens that followed (the latest), shared
    by all sequences, bounded (least recently written first out)."""

    def __init__(self, n_min: int, n_max: int, max_entries: int = 1 << 20, follow: int = 16):
        self.sizes = lookup_sizes(n_min, n_max)
        self.table: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        self.max_entries, self.follow = max_entries, follow

    def add(self, tokens: list[int]) -> None:
        for end in range(1, len(tokens)):
            after = tuple(tokens[end: end + self.follow])
            for n in self.sizes:
                if n <= end:
                    key = tuple(tokens[end - n: end])
                    self.table[key] = after
                    self.table.move_to_end(key)
        while len(self.table) > self.max_entries:
            self.table.popitem(last=False)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n in self.sizes:
            if n <= len(tokens) and (after := self.table.get(tuple(tokens[-n:]))):
                return list(after[:k])
        return []


@dataclass
class Acceptance:
    """A sequence's per-token acceptance, alpha: kept drafts over tries (a try ends with a
    rejection or the draft's end), both decayed so that recent steps count most."""
    kept: float = 0.0
    tries: float = 0.0
    PRIOR: float = 0.6                 # alpha before any evidence, and where idle ones drift
    WEIGHT: float = 2.0                # the prior counts as this many tries
    DECAY: float = 0.85                # per verified draft
    IDLE_DECAY: float = 0.97           # per step without a draft
    idle_steps: int = 0                # decode steps since its last draft

    @property
    def alpha(self) -> float:
        a = (self.kept + self.PRIOR * self.WEIGHT) / (self.tries + self.WEIGHT)
        return min(a, 0.99)

    def record(self, drafted: int, kept: int) -> None:
        self.kept = self.kept * self.DECAY + kept
        self.tries = self.tries * self.DECAY + kept + (kept < drafted)

    def idle(self) -> None:
        self.idle_steps += 1
        self.kept *= self.IDLE_DECAY
        self.tries *= self.IDLE_DECAY


class StepCost:
    """Measured step time as base + per_token * tokens (decayed least squares over recent
    steps): the price of one more computed token, in the tokens a plain decode step of the
    same batch would emit in that time."""
    DECAY = 0.98
    PRIOR_SHARE = 0.03                 # one more token's time, as a share of a step, until measured

    def __init__(self):
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.DECAY
        self.n, self.sx, self.sy = self.n * d + 1, self.sx * d + tokens, self.sy * d + seconds
        self.sxx, self.sxy = self.sxx * d + tokens * tokens, self.sxy * d + tokens * seconds

    def per_token(self) -> float:
        """Seconds one more computed token adds to a step."""
        if not self.n:
            return 0.0
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        prior = self.PRIOR_SHARE * mean_y
        var = self.sxx - self.sx * self.sx / self.n
        if var < 4.0:                  # token counts hardly varied yet: no slope to read
            return prior
        slope = (self.sxy - self.sx * self.sy / self.n) / var
        # noise (a busy neighbour) can make the fit steeper than the mean time per token,
        # which no step with a non-negative base time allows
        return min(max(slope, 0.1 * prior), mean_y / mean_x)

    def base(self) -> float:
        """Seconds of a step that do not grow with its tokens (the fit's intercept, >= 0)."""
        if not self.n:
            return 0.0
        return max(0.0, (self.sy - self.per_token() * self.sx) / self.n)

    def token_price(self, batch: int, extra: float = 0.0) -> float:
        """One more computed token (plus `extra` seconds of drafting), in the tokens that a
        plain step of `batch` sequences emits per second: batch / (base + per_token * batch).
        A step bound by its tokens (base ~ 0) prices a token at ~1: only a sure guess pays."""
        b = self.per_token()
        step = self.base() + b * max(1, batch)
        return (b + extra) * max(1, batch) / step if step > 0 else 0.0


def draft_length(alpha: float, price: float, k_max: int) -> int:
    """The most draft tokens whose chance of being kept (alpha**j for the j-th) exceeds the
    price of computing one more token."""
    if price <= 0:
        return k_max
    if price >= 1 or alpha <= price:
        return 0
    return max(0, min(k_max, int(math.log(price) / math.log(alpha))))


@dataclass
class SpecState:
    """A sequence's speculative state (Sequence.spec_state)."""
    acceptance: Acceptance = field(default_factory=Acceptance)
    index: NgramIndex | None = None


@dataclass
class SpecStats:
    """Counters named as vLLM's spec_decode metrics."""
    num_drafts: int = 0                # verified drafts (sequence-steps with a draft)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified draft: 1 + kept drafts (vLLM's definition)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculator:
    """Chooses each decoding sequence's draft length and fills Sequence.draft_ids after a
    step; keeps the counters. `model_proposer`: for method "draft", an object with
    propose(seqs, lengths, live) -> list[list[int]] and seconds_per_step
    (engine/draft_model.py)."""

    def __init__(self, config: SpeculativeConfig, model_proposer=None):
        if (config.method == "draft") != (model_proposer is not None):
            raise ValueError("method 'draft' needs a draft model, and only it")
        self.config, self.model_proposer = config, model_proposer
        self.cost = StepCost()
        self.stats = SpecStats()
        self.draft_seconds = 0.0       # one draft-model step, recent mean
        c = config
        self.suffix = (SuffixTable(c.prompt_lookup_min, c.prompt_lookup_max)
                       if c.method == "suffix" else None)

    # -- after a step ------------------------------------------------------------------
    def warm_up(self) -> None:
        """The draft model's ModelRunner.warm_up, on the calling (engine) thread."""
        if self.model_proposer is not None:
            self.model_proposer.warm_up()

    def record_step(self, tokens: int, seconds: float) -> None:
        self.cost.add(tokens, seconds)

    def record(self, seq, drafted: int, kept: int) -> None:
        st = self.stats
        st.num_drafts += 1
        st.num_draft_tokens += drafted
        st.num_accepted_tokens += kept
        while len(st.accepted_per_pos) < drafted:
            st.accepted_per_pos.append(0)
        for j in range(kept):
            st.accepted_per_pos[j] += 1
        seq.num_draft_tokens += drafted
        seq.num_accepted_tokens += kept
        _state(seq).acceptance.record(drafted, kept)

    def finished(self, seq) -> None:
        if self.suffix is not None and seq.output_ids:
            self.suffix.add(seq.all_ids)

    def propose(self, seqs: list) -> None:
        """Fill draft_ids of the sequences that decode next (their last token sampled)."""
        c = self.config
        price = self.cost.token_price(len(seqs), self.draft_seconds)
        wanted, lengths = [], []
        for seq in seqs:
            seq.draft_ids = []
            room = seq.max_tokens - len(seq.output_ids) - 1
            if (room <= 0 or seq.num_computed_tokens != seq.num_tokens - 1
                    or seq.params.pooling is not None):
                continue
            acc = _state(seq).acceptance
            k = (draft_length(acc.alpha, price, c.num_speculative_tokens) if c.adaptive
                 else c.num_speculative_tokens)
            if k <= 0 and acc.idle_steps >= PROBE_EVERY:
                k = PROBE_TOKENS           # look again: the text may have turned repetitive
            k = min(k, room)
            if k <= 0:
                acc.idle()
                continue
            acc.idle_steps = 0
            wanted.append(seq)
            lengths.append(k)
        if self.model_proposer is not None:
            drafts = self.model_proposer.propose(wanted, lengths,
                                                 live={s.seq_id for s in seqs})
            self.draft_seconds = self.model_proposer.seconds_per_step / max(1, len(wanted))
        else:
            drafts = [self._lookup(seq, k) for seq, k in zip(wanted, lengths)]
        for seq, draft in zip(wanted, drafts):
            held = getattr(seq.sampler_state, "constraint", None)
            if held is not None and draft:     # only what the grammar would allow
                draft = draft[: held.valid_prefix(draft)]
            seq.draft_ids = list(draft)
            if not draft:
                _state(seq).acceptance.idle()

    def _lookup(self, seq, k: int) -> list[int]:
        c, st = self.config, _state(seq)
        if st.index is None:
            st.index = NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max)
        tokens = seq.all_ids
        draft = st.index.propose(tokens, k)
        if not draft and self.suffix is not None:
            draft = self.suffix.propose(tokens, k)
        return draft


def _state(seq) -> SpecState:
    if seq.spec_state is None:
        seq.spec_state = SpecState()
    return seq.spec_state
