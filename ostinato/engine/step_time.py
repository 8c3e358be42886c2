"""A latency target for the scheduler: how many prefill tokens fit in a step. Pure Python, no
torch and no clock: the engine feeds each step's measured seconds in (StepTimeModel.add), the
scheduler asks how long its decode rows will take and how large a prefill chunk fits in the
time left (StepBudget).

The model: seconds = base + per_token * tokens + per_pair * pairs + per_row * rows, where
`pairs` counts the (query, key) pairs the step's attention reads (a chunk of n tokens from
position s reads n*s + n*(n+1)/2) and `rows` the sequences that sample (an LM-head row and a
sampler call each), fitted by decayed least squares over recent steps. Until the steps have
varied enough to tell base from per-token time, the fit leans on a conservative prior: no base,
all of a step's time per token (so chunks come out small, never large).

The target (LatencyTarget): "auto" (the server's default; the offline LLM's is "off") keeps a
step that carries prefill within AUTO_RATIO times the time its decode rows alone would take
(at least AUTO_FLOOR_S), so the inter-token latency of running streams stays within that ratio of a pure decode step while
long prompts arrive; a number of milliseconds fixes it; "off" (or 0) leaves only the token
budget (max_num_batched_tokens). A step without decode rows stretches nobody's next token: it
gets the whole token budget. A waiting prompt always gets at least MIN_PREFILL_TOKENS a step,
so a target tighter than the decode rows alone never starves it."""
from __future__ import annotations

import math
from dataclasses import dataclass

AUTO_RATIO = 1.25          # auto: a step with prefill takes at most this times a decode step
AUTO_FLOOR_S = 0.050       # auto: at least 50 ms (a lone stream's 7 ms step starves prefill)
MIN_PREFILL_TOKENS = 8     # prefill progress per step, whatever the target
PAIR_SCALE = 1e-3          # pairs are counted in thousands (features of similar size)


def attention_pairs(start: int, n: int) -> int:
    """(query, key) pairs that n new tokens from position `start` attend over (causal)."""
    return n * start + n * (n + 1) // 2


def step_features(plan) -> tuple[int, int, int]:
    """(tokens, pairs, rows) of a SchedulerOutput, as StepTimeModel.add takes them."""
    pairs = sum(attention_pairs(s.start, s.num_new_tokens) for s in plan.scheduled)
    return plan.num_tokens, pairs, sum(1 for s in plan.scheduled if s.samples)


@dataclass(frozen=True)
class LatencyTarget:
    """seconds: a fixed step target; None with auto=True: AUTO_RATIO x the decode step."""
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

    def step_seconds(self, decode_seconds: float) -> float:
        if self.auto:
            return max(AUTO_FLOOR_S, AUTO_RATIO * decode_seconds)
        return self.seconds

    def describe(self) -> str:
        if self.auto:
            return (f"auto ({AUTO_RATIO}x the decode step, at least "
                    f"{AUTO_FLOOR_S * 1e3:.0f} ms)")
        return f"{self.seconds * 1e3:g} ms"


class StepTimeModel:
    """seconds ~ base + per_token * tokens + per_pair * pairs + per_row * rows (rows: the
    sequences that sample, each one LM-head row and a sampler call), by decayed least squares
    with a light pull towards the prior (only per-token time: the mean time per token)."""
    DECAY = 0.98               # per step: about the last 50 steps count
    PULL = 1e-4                # the prior's weight, as a share of each feature's own weight
    K = 4                      # features: 1, tokens, pairs (thousands), rows

    def __init__(self):
        self.w = 0.0                                        # decayed number of steps
        self.xx = [[0.0] * self.K for _ in range(self.K)]   # decayed sums of x x^T
        self.xy = [0.0] * self.K
        self._coef: tuple[float, ...] | None = None

    @property
    def ready(self) -> bool:
        return self.w > 0

    def add(self, tokens: int, pairs: int, rows: int, seconds: float) -> None:
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

    def predict(self, tokens: int, pairs: int, rows: int) -> float:
        base, per_token, per_pair, per_row = self.coef()
        if not tokens:
            return 0.0
        return base + per_token * tokens + per_pair * pairs * PAIR_SCALE + per_row * rows

    def chunk_seconds(self, start: int, n: int) -> float:
        """What a prefill chunk of n tokens from `start` adds to a step."""
        _, a, b, _ = self.coef()
        return a * n + b * attention_pairs(start, n) * PAIR_SCALE

    def chunk_tokens(self, seconds: float, start: int) -> int:
        """The most tokens a prefill chunk from position `start` adds within `seconds`."""
        _, a, b, _ = self.coef()
        if seconds <= 0 or a <= 0:
            return 0
        b *= PAIR_SCALE
        if b <= 0:
            return int(seconds / a)
        # b/2 n^2 + (a + b (start + 1/2)) n <= seconds
        lin = a + b * (start + 0.5)
        n = int((-lin + math.sqrt(lin * lin + 2 * b * seconds)) / b)
        while n > 0 and self.chunk_seconds(start, n) > seconds:      # rounding
            n -= 1
        return n


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
                 decode_pairs: int, decode_rows: int):
        self.model = model
        self.limited = decode_tokens > 0 and model.ready    # nobody decoding: no time limit
        decode_s = model.predict(decode_tokens, decode_pairs, decode_rows)
        self.target_seconds = target.step_seconds(decode_s)
        self.seconds_left = self.target_seconds - decode_s
        self.prefill_tokens = 0

    def take(self, start: int, wanted: int) -> int:
        """Tokens of a prefill chunk from `start` (wanted: what is left of it) this step."""
        if not self.limited:
            return wanted
        n = self.model.chunk_tokens(self.seconds_left, start)
        if self.prefill_tokens == 0:
            n = max(n, MIN_PREFILL_TOKENS)           # progress, whatever the target
        n = min(n, wanted)
        if n > 0:
            self.seconds_left -= self.model.chunk_seconds(start, n)
            self.prefill_tokens += n
        return n


def target_line(target: LatencyTarget | None, max_num_batched_tokens: int) -> str:
    """What the scheduler's step target is, for the startup log."""
    what = target.describe() if target is not None else "off"
    return (f"scheduler: step-time target {what}, at most {max_num_batched_tokens} tokens "
            f"a step")
