"""A latency target for the scheduler: how many prefill tokens fit in a step. Pure Python, no
torch and no clock: the engine feeds each step's measured seconds in (StepTimeModel.add), the
scheduler asks how long its decode rows will take and how large a prefill chunk fits in the
time left (StepBudget).

The model: seconds = base + per_token * tokens + per_pair * pairs + per_row * rows, where
`pairs` counts the (query, key) pairs the step's attention reads, averaged over the layers (a
chunk of n tokens from position s reads n*s + n*(n+1)/2 in a layer that sees the whole
context, at most n*W in one with a sliding window of W: AttentionSpan) and `rows` the
sequences that sample (an LM-head row and a sampler call each), fitted by decayed least
squares over recent steps. Until the steps have varied enough to tell base from per-token
time, the fit leans on a conservative prior: no base, all of a step's time per token (so
chunks come out small, never large).

The target (LatencyTarget): a number of milliseconds fixes it; "off" (or 0) leaves only the
token budget (max_num_batched_tokens); "auto" (the server's default; the offline LLM's is
"off") follows demand. Even inter-token latency needs *uniform* steps, not short ones: a step
that carries prefill beside decode rows takes
    max(AUTO_FLOOR_S, AUTO_RATIO x t_d, t_s, level)
(t_d: the predicted time of its decode rows alone; t_s: of the decode step the running and
the waiting sequences that have a seat will make once admitted, within AUTO_SEATED_MAX_S: a
burst's prompts are taken in steps about as long as the steps that follow them, so the running
batch fills at once and the tokens stay even; in a closed loop at 64 streams the 1.25x rule
alone admitted a few prompts a step and ran 22 sequences of the 64. The bound is a constant,
not a multiple of t_d: with long prompts queued, a step k x t_d long admits more prompts, whose
decode rows lengthen t_d and so the next step; at k = 3.75 (the bound until 2026-11-30) that
loop climbed, step after step, from 60 to 200-370 ms at 64 streams, and the ITL p99/p50 of a
Poisson run swung from 1.1 to 1.7 with where the climb stopped),
and the level (AutoDemand) is a slow
feedback loop on the prefill queue, in steps: it rises AUTO_UP a step while prefill is
*behind* (the pending prefill, running and waiting prompts, would take more than AUTO_BEHIND_S
of engine time at the step's prefill share), falls AUTO_DOWN a decoding step that carried no
prefill (prefill ran dry, or no seat is free for the queue: a longer step would only stretch
tokens), and holds otherwise; it stays within AUTO_MAX_RATIO x the no-demand rule (t_s
included) and a step of the whole token budget. So under a load the rule keeps up with,
auto is the rule (steps of 30 ms or 1.25 x t_d: prefill in nearly every step, tokens even);
in overload, or a load the rule falls behind on, the level climbs over a few hundred steps
(consecutive steps hardly differ) to up to 3x the rule: fewer, larger steps, each paying
the per-step base cost once, so throughput comes close to "off"'s while every step is still
the same length. Why not larger: past about 3x a seat-limited engine (max_num_seqs) runs
prefill dry between admissions and steps stop being uniform (ostinato/bench/schedsim.py
measures all of this). The scheduler reads no clock: the level counts steps and predicted
seconds, and a burst (below) compares the arrival times the engine stamped.

A step without decode rows stretches nobody's next token: it gets the whole token budget.
Under auto, a step whose decode rows all came with the queue (the whole queue has a seat,
none of it was preempted, and no decode row arrived more than BURST_WINDOW_S before its
oldest) may take BURST_RATIO x the decode step of the batch the burst will make (t_s), or
the rule if that is longer: a burst of requests that came together (a client fanning out 64
calls, a closed-loop load generator's round) has no earlier cadence to keep, and admitting
it in steps only as long as t_s spread its finishes over seconds (SmolLM2, 64 streams: 60
steps of 52 ms carrying ~70 prompt tokens each, the last of the burst 3 s after the first)
and ended the batch in a tail of a few rows. The bound is the burst's own cadence, not the
whole token budget: a busy neighbour stretches steps, and 2-3x the rule took the contended
ITL p99 over 3x the quiet p50 (BURST_RATIO). A burst larger than the seats is none: its
first rows have a cadence by the time the rest find seats. A stream that arrived before the
burst keeps the rule for every row, so Poisson arrivals rarely make one (two requests within
0.5 s into an idle engine do: 8 steps in a served 16-stream run of 2,031). A waiting prompt
always gets at least MIN_PREFILL_TOKENS a step, so a target tighter than the decode rows
alone never starves it."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

AUTO_RATIO = 1.25          # auto: a step with prefill takes at least this times a decode step
AUTO_FLOOR_S = 0.030       # auto: at least 30 ms (a lone stream's 7 ms step starves prefill;
                           # 50 ms until 2026-11-30, then 35: a step that carries a prompt
                           # beside 4 streams' 12 ms decode steps sets their ITL p99, and
                           # beside a busy process 50 ms gave 4.1x the quiet p50, 35 ms
                           # 3.0-3.4x, 30 ms 2.6-2.9x)
AUTO_BEHIND_S = 60.0       # auto: prefill is behind when what is pending would take longer
AUTO_UP = 0.004            # auto: the level rises 0.4% a step while prefill is behind
AUTO_DOWN = 0.02           # auto: it falls 2% a decoding step that carried no prefill
AUTO_MAX_RATIO = 3.0       # auto: the level stays within 3x the no-demand rule (t_s included)
AUTO_SEATED_MAX_S = AUTO_MAX_RATIO * AUTO_FLOOR_S    # auto: t_s counts up to 90 ms
BURST_RATIO = 1.5          # auto: a burst's steps take up to this times the decode step it
                           # will make (or the rule, if longer). Beside a busy process, the
                           # closed-loop ITL p99 over the quiet p50 at 16 / 64 streams, two
                           # runs: 3x the rule 2.40, 4.98 / 3.80, 4.79; 2x the rule 3.79,
                           # 3.77 / 3.59, 2.33; 1.5x this step 2.43, 2.55 / 2.37, 2.31
BURST_WINDOW_S = 0.5       # auto: a decode row the engine took at most this before the oldest
                           # seated waiting request came with it (the async engine takes the
                           # requests that reach it during a step together, at the next one;
                           # a burst of 64 took 2 steps, 80 ms)
MIN_PREFILL_TOKENS = 8     # prefill progress per step, whatever the target
PAIR_SCALE = 1e-3          # pairs are counted in thousands (features of similar size)


def attention_pairs(start: int, n: int) -> int:
    """(query, key) pairs that n new tokens from position `start` attend over (causal)."""
    return n * start + n * (n + 1) // 2


def window_pairs(start: int, n: int, window: int) -> int:
    """The pairs of attention_pairs in a layer whose queries see at most `window` keys (the
    last `window` positions, their own included)."""
    a, b = start + 1, start + n                    # keys of the first and the last query
    if b <= window:
        return attention_pairs(start, n)
    if a > window:
        return n * window
    return (a + window) * (window - a + 1) // 2 + (b - window) * window


@dataclass(frozen=True)
class AttentionSpan:
    """What a model's attention reads: (window, layers) pairs, window None for the layers that
    see the whole context. pairs() is the mean over the layers, so that a sliding-window
    layer's cost stops growing at its window (Gemma 3: 5 of every 6 layers see 512 keys; a
    chunk at position 1,800 reads 2.6x fewer pairs than the whole-context count says). The
    default, every layer whole, counts attention_pairs exactly."""
    layers: tuple[tuple[int | None, int], ...] = ((None, 1),)

    @classmethod
    def of_layers(cls, windows: Iterable[int | None]) -> AttentionSpan:
        """One window (or None) per layer; no window at all is the whole-context count."""
        counts = Counter(windows)
        if not counts or any(w is not None and w < 1 for w in counts):
            raise ValueError(f"AttentionSpan: windows must be >= 1 or None, got {dict(counts)}")
        if set(counts) == {None}:
            return cls()
        return cls(tuple(sorted(counts.items(), key=lambda wc: (wc[0] is not None, wc[0] or 0))))

    def pairs(self, start: int, n: int) -> float:
        if len(self.layers) == 1 and self.layers[0][0] is None:
            return attention_pairs(start, n)
        total = sum(c * (attention_pairs(start, n) if w is None else window_pairs(start, n, w))
                    for w, c in self.layers)
        return total / sum(c for _, c in self.layers)


WHOLE_CONTEXT = AttentionSpan()


def step_features(plan, span: AttentionSpan = WHOLE_CONTEXT) -> tuple[int, float, int]:
    """(tokens, pairs, rows) of a SchedulerOutput, as StepTimeModel.add takes them."""
    pairs = sum(span.pairs(s.start, s.num_new_tokens) for s in plan.scheduled)
    return plan.num_tokens, pairs, sum(1 for s in plan.scheduled if s.samples)


@dataclass(frozen=True)
class LatencyTarget:
    """seconds: a fixed step target; None with auto=True: the rule and the scheduler's
    AutoDemand level (see the module docstring)."""
    seconds: float | None = None
    auto: bool = True

    @classmethod
    def parse(cls, value) -> LatencyTarget | None:
        """'auto' / None -> auto; 'off' / 0 -> None (token budget only); a number of ms."""
        if value is None or value == "auto":
            return cls()
        if isinstance(value, str):
            if value.strip().lower() == "off":
                return None
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"target_itl_ms {value!r}: a number of milliseconds, "
                                 f"'auto' or 'off'") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not \
                math.isfinite(value) or value < 0:
            raise ValueError(f"target_itl_ms {value!r}: a number of milliseconds >= 0, "
                             f"'auto' or 'off'")
        return None if value == 0 else cls(seconds=value / 1e3, auto=False)

    def step_seconds(self, decode_seconds: float, level: float = 0.0,
                     seated_seconds: float = 0.0) -> float:
        """The step's time: fixed, or (auto) at least the no-demand rule, the decode step of
        the batch the queue will make (seated_seconds) and AutoDemand's level."""
        if self.auto:
            return max(AUTO_FLOOR_S, AUTO_RATIO * decode_seconds, seated_seconds, level)
        return self.seconds

    def describe(self) -> str:
        if self.auto:
            return (f"auto (at least {AUTO_RATIO}x the decode step, "
                    f"{AUTO_FLOOR_S * 1e3:.0f} ms and the decode step of the batch the queue "
                    f"will make, rising while prefill falls behind: "
                    f"uniform steps that keep up with demand)")
        return f"{self.seconds * 1e3:g} ms"


class AutoDemand:
    """auto's step-time level (seconds). After planning each step that has decode rows the
    scheduler calls update(): a step without prefill lowers the level by `down` (prefill ran
    dry or no seat is free: longer steps would only stretch tokens); a step with prefill while
    prefill is behind (the scheduler's test, with behind_s) raises it by `up`; otherwise it
    holds. It stays within [low, high]: low the no-demand rule of this step, high max_ratio x
    that or the token budget's step."""

    def __init__(self, up: float = AUTO_UP, down: float = AUTO_DOWN,
                 behind_s: float = AUTO_BEHIND_S, max_ratio: float = AUTO_MAX_RATIO):
        self.up, self.down, self.behind_s, self.max_ratio = up, down, behind_s, max_ratio
        self.level = 0.0

    def update(self, had_prefill: bool, behind: bool, low: float, high: float) -> float:
        level = max(self.level, low)
        if not had_prefill:
            level *= 1 - self.down
        elif behind:
            level *= 1 + self.up
        self.level = max(low, min(level, high))
        return self.level


class StepTimeModel:
    """seconds ~ base + per_token * tokens + per_pair * pairs + per_row * rows (rows: the
    sequences that sample, each one LM-head row and a sampler call), by decayed least squares
    with a light pull towards the prior (only per-token time: the mean time per token)."""
    DECAY = 0.98               # per step: about the last 50 steps count
    PULL = 1e-4                # the prior's weight, as a share of each feature's own weight
    K = 4                      # features: 1, tokens, pairs (thousands), rows

    def __init__(self, span: AttentionSpan = WHOLE_CONTEXT):
        self.span = span                                    # how pairs are counted
        self.w = 0.0                                        # decayed number of steps
        self.xx = [[0.0] * self.K for _ in range(self.K)]   # decayed sums of x x^T
        self.xy = [0.0] * self.K
        self._coef: tuple[float, ...] | None = None

    @property
    def ready(self) -> bool:
        return self.w > 0

    def features(self, plan) -> tuple[int, float, int]:
        """(tokens, pairs, rows) of a SchedulerOutput, pairs counted by this model's span."""
        return step_features(plan, self.span)

    def pairs(self, start: int, n: int) -> float:
        return self.span.pairs(start, n)

    def add(self, tokens: int, pairs: float, rows: int, seconds: float) -> None:
        if tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        x, d = (1.0, float(tokens), pairs * PAIR_SCALE, float(rows)), self.DECAY
        self.w = self.w * d + 1
        for i in range(self.K):
            self.xy[i] = self.xy[i] * d + x[i] * seconds
            for j in range(self.K):
                self.xx[i][j] = self.xx[i][j] * d + x[i] * x[j]
        self._coef = None

    def coef(self) -> tuple[float, ...]:
        """(base s, s per token, s per thousand pairs, s per row), each >= 0; zeros before
        any step."""
        if self._coef is None:
            self._coef = self._fit() if self.ready else (0.0,) * self.K
        return self._coef

    def _fit(self) -> tuple[float, ...]:
        prior = [0.0, self.xy[0] / self.xx[0][1], 0.0, 0.0]     # mean seconds / mean tokens
        a = [row[:] for row in self.xx]
        b = self.xy[:]
        for i in range(self.K):
            pull = self.PULL * self.xx[i][i] + 1e-12
            a[i][i] += pull
            b[i] += pull * prior[i]
        x = _solve(a, b) or prior
        if x[1] <= 0:                      # noise: never let a token look free
            return tuple(prior)
        return tuple(max(0.0, v) for v in x)

    def predict(self, tokens: int, pairs: float, rows: int) -> float:
        base, per_token, per_pair, per_row = self.coef()
        if not tokens:
            return 0.0
        return base + per_token * tokens + per_pair * pairs * PAIR_SCALE + per_row * rows

    def chunk_seconds(self, start: int, n: int) -> float:
        """What a prefill chunk of n tokens from `start` adds to a step."""
        _, a, b, _ = self.coef()
        return a * n + b * self.span.pairs(start, n) * PAIR_SCALE

    def row_seconds(self) -> float:
        """What a sampling row (an LM-head row and a sampler call) adds to a step."""
        return max(0.0, self.coef()[3])

    def chunk_tokens(self, seconds: float, start: int) -> int:
        """The most tokens a prefill chunk from position `start` adds within `seconds`
        (chunk_seconds grows with n: a bisection, as windows make it piecewise)."""
        _, a, _, _ = self.coef()
        if seconds <= 0 or a <= 0:
            return 0
        lo, hi = 0, min(int(seconds / a) + 1, 1 << 40)   # pairs cost >= 0: n <= seconds / a
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.chunk_seconds(start, mid) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """a x = b by Gaussian elimination with partial pivoting; None if singular."""
    k = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    for c in range(k):
        p = max(range(c, k), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, k):
            f = m[r][c] / m[c][c]
            for j in range(c, k + 1):
                m[r][j] -= f * m[c][j]
    x = [0.0] * k
    for r in reversed(range(k)):
        x[r] = (m[r][k] - sum(m[r][j] * x[j] for j in range(r + 1, k))) / m[r][r]
    return x


class StepBudget:
    """One step's prefill allowance: the target minus what its decode rows will take."""

    def __init__(self, target: LatencyTarget, model: StepTimeModel, decode_tokens: int,
                 decode_pairs: float, decode_rows: int, level: float = 0.0,
                 seated: tuple[int, float, int] = (0, 0, 0), burst: bool = False):
        """level: auto's step-time level (AutoDemand); seated: (tokens, pairs, rows) the
        waiting sequences that have a seat will add to the decode rows once admitted; burst:
        the decode rows all came with the queue (auto only: BURST_RATIO x the seated step,
        module doc)."""
        self.model = model
        self.level, self.auto = level, target.auto       # (the step log reads them)
        self.decode_tokens = decode_tokens
        self.decode_seconds = decode_s = model.predict(decode_tokens, decode_pairs, decode_rows)
        seated_s = model.predict(decode_tokens + seated[0], decode_pairs + seated[1],
                                 decode_rows + seated[2]) if seated[2] else 0.0
        # bounded: the model, fitted mostly on prefill while a burst is admitted, over-predicts
        # a large decode step (2.5-3.5x at 64 rows); by a constant, not by t_d (module doc)
        self.seated_seconds = seated_s = min(seated_s, AUTO_SEATED_MAX_S)
        # the rule (AutoDemand's bounds) counts the seated batch: under overload the queue
        # keeps every seat filled and the level holds steps at that length; bounded by the
        # rest of the rule alone, steps alternated (Poisson 3/s at 64 streams, ours alone:
        # ITL p99/p50 2.05 against 1.16)
        self.rule_seconds = target.step_seconds(decode_s, 0.0, seated_s)  # without the level
        self.limited = decode_tokens > 0 and model.ready    # nobody decoding: no time limit
        self.burst = burst and target.auto and self.limited
        if self.burst:                   # a burst's own rows: 1.5x their own decode step
            level = max(level, BURST_RATIO * seated_s)
        self.target_seconds = target.step_seconds(decode_s, level, seated_s)
        self.seconds_left = self.target_seconds - decode_s
        self.prefill_tokens = 0

    def take(self, start: int, wanted: int) -> int:
        """Tokens of a prefill chunk from `start` (wanted: what is left of it) this step."""
        if not self.limited:
            return wanted
        row = self.model.row_seconds()               # a chunk that ends its prompt samples
        n = self.model.chunk_tokens(self.seconds_left, start)
        if n >= wanted:
            n = self.model.chunk_tokens(self.seconds_left - row, start)
        if self.prefill_tokens == 0:
            n = max(n, MIN_PREFILL_TOKENS)           # progress, whatever the target
        n = min(n, wanted)
        if n > 0:
            self.seconds_left -= self.model.chunk_seconds(start, n) + (row if n == wanted else 0)
            self.prefill_tokens += n
        return n


def target_line(target: LatencyTarget | None, max_num_batched_tokens: int) -> str:
    """What the scheduler's step target is, for the startup log."""
    what = target.describe() if target is not None else "off"
    return (f"scheduler: step-time target {what}, at most {max_num_batched_tokens} tokens "
            f"a step")
