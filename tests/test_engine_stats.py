"""The engine's per-step figures stay bounded for the life of a server, and their
aggregates stay exact."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ostinato.engine.engine import Engine, EngineStats
from ostinato.engine.stats import RECENT_STEPS, StepSeries


def test_series_keeps_the_last_values_and_exact_aggregates():
    s = StepSeries(keep=8)
    values = [(i * 7) % 23 for i in range(1000)]
    for v in values:
        s.append(v)
    assert len(s) == len(s.recent) == 8
    assert list(s) == values[-8:]
    assert s.count == 1000 and s.total == sum(values) and s.peak == max(values)
    assert s.mean() == pytest.approx(sum(values) / 1000)


def test_since_gives_the_new_steps_and_refuses_dropped_ones():
    s = StepSeries(keep=8)
    for v in range(10):
        s.append(v)
    n0 = s.count
    for v in (10, 11, 12):
        s.append(v)
    assert s.since(n0) == [10, 11, 12]
    assert s.since(s.count) == []
    assert s.since(5) == [5, 6, 7, 8, 9, 10, 11, 12]      # all 8 kept
    with pytest.raises(ValueError, match="not all kept"):
        s.since(4)                                        # step 4 was dropped
    assert StepSeries().mean() == 0.0


def fake_engine() -> SimpleNamespace:
    kv = SimpleNamespace(prefix_queries=0, prefix_hits=0, usage=lambda: 0.0)
    sched = SimpleNamespace(num_preemptions=0, kv=kv, running=[], waiting=[])
    return SimpleNamespace(stats=EngineStats(), scheduler=sched)


def test_a_long_running_engine_keeps_bounded_stats():
    eng = fake_engine()
    steps = 3 * RECENT_STEPS + 5
    for i in range(steps):
        plan = SimpleNamespace(scheduled=[None] * (1 + i % 4), num_tokens=1 + i % 100)
        Engine._record(eng, plan)
    st = eng.stats
    assert st.steps == steps
    for series in (st.batch_sizes, st.tokens_per_step):
        assert len(series.recent) == RECENT_STEPS and series.count == steps
    assert st.batch_sizes.total == sum(1 + i % 4 for i in range(steps))
    assert st.tokens_per_step.peak == 100
    assert list(st.tokens_per_step)[-1] == 1 + (steps - 1) % 100
