"""Per-step engine figures in bounded memory: a server steps millions of times in its life,
so a series keeps its last values and running aggregates, never one entry per step."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

RECENT_STEPS = 4096               # values a series keeps (a few seconds to minutes of steps)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class StepSeries:
    """One number per engine step: the last `keep` values, and the count, sum and maximum
    of all of them since the start."""

    def __init__(self, keep: int = RECENT_STEPS):
        self.recent: deque[int] = deque(maxlen=keep)
        self.count = 0
        self.total = 0
        self.peak = 0

    def append(self, value: int) -> None:
        self.recent.append(value)
        self.count += 1
        self.total += value
        self.peak = max(self.peak, value)

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def since(self, count: int) -> list[int]:
        """The values of the steps after the first `count`; raises if some are no longer kept."""
        new = self.count - count
        if not 0 <= new <= len(self.recent):
            raise ValueError(f"steps {count}..{self.count} are not all kept "
                             f"(the last {len(self.recent)} are)")
        return list(self.recent)[len(self.recent) - new:]

    def __iter__(self) -> Iterator[int]:
        """The kept values, oldest first."""
        return iter(self.recent)

    def __len__(self) -> int:
        return len(self.recent)
