"""Scheduler on plain integers: token budget, decode before prefill, chunked prefill, prefix hits
at admission, preemption and resume, abort. A fake model writes token ids into fake KV slots and
checks every slot a step's queries read, so a wrong block table cannot go unnoticed."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from ostinato.engine.kv_cache import NULL_BLOCK, KVCacheManager
from ostinato.engine.scheduler import Scheduler
from ostinato.engine.sequence import SchedulerOutput, Sequence, Status
from ostinato.engine.step_time import (
    AUTO_FLOOR_S,
    AUTO_RATIO,
    AUTO_SEATED_MAX_S,
    BURST_RATIO,
    BURST_WINDOW_S,
    MIN_PREFILL_TOKENS,
    WHOLE_CONTEXT,
    AttentionSpan,
    LatencyTarget,
    StepTimeModel,
    attention_pairs,
    step_features,
    window_pairs,
)

BS = 4


def make_seq(seq_id: str, prompt, prompt_logprobs=None) -> Sequence:
    params = SimpleNamespace(prompt_logprobs=prompt_logprobs, pooling=None)
    return Sequence(seq_id, seq_id, 0, list(prompt), params, max_tokens=1000)


def make_sched(blocks=64, budget=64, max_seqs=16, windows=(None,), caching=True) -> Scheduler:
    kv = KVCacheManager([blocks] * len(windows), BS, list(windows), caching)
    return Scheduler(kv, max_seqs, budget)


class FakeModel:
    """KV memory holding token ids: mem[group][(block, offset)]. A step writes its tokens'
    slots, then checks that every position its queries can see holds the right token."""

    def __init__(self, kv: KVCacheManager):
        self.kv, self.mem = kv, [{} for _ in kv.pools]

    def run(self, plan: SchedulerOutput) -> None:
        for s in plan.scheduled:
            ids, end = s.seq.all_ids, s.start + s.num_new_tokens
            for g, table in enumerate(s.block_tables):
                for p in range(s.start, end):
                    assert self.kv.pools[g].ref[table[p // BS]] == 1, "write to a shared block"
                    self.mem[g][table[p // BS], p % BS] = ids[p]
                w = self.kv.windows[g]
                for p in range(max(0, s.start - w + 1) if w else 0, end):
                    assert table[p // BS] != NULL_BLOCK, f"position {p} is visible but null"
                    assert self.mem[g].get((table[p // BS], p % BS)) == ids[p], f"bad KV at {p}"


def step(sched: Scheduler, model: FakeModel | None = None) -> list[tuple[str, int]]:
    """One engine step; a sequence that samples gets token 1000 + its output length."""
    plan = sched.schedule()
    assert plan.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    if model:
        model.run(plan)
    for s in plan.scheduled:
        assert s.start == s.seq.num_computed_tokens and s.num_new_tokens > 0
        s.seq.num_computed_tokens += s.num_new_tokens
        if s.samples:
            s.seq.output_ids.append(1000 + len(s.seq.output_ids))
    sched.check_integrity()
    return [(s.seq.seq_id, s.num_new_tokens) for s in plan.scheduled]


def test_chunked_prefill_within_the_budget():
    sched = make_sched(budget=8)
    a, b = make_seq("a", range(10)), make_seq("b", range(50, 55))
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 8)]                   # a's prompt is split over two steps
    assert a.output_ids == []
    assert step(sched) == [("a", 2), ("b", 5)]
    assert step(sched) == [("a", 1), ("b", 1)]
    assert a.output_ids == [1000, 1001] and b.output_ids == [1000, 1001]


def test_decode_before_prefill_and_join_every_step():
    sched = make_sched(budget=8)
    a = make_seq("a", range(3))
    sched.add(a)
    assert step(sched) == [("a", 3)]
    sched.add(make_seq("c", range(20)))
    assert step(sched) == [("a", 1), ("c", 7)]        # the running decode goes first
    sched.finish(a, "stop")
    assert step(sched) == [("c", 8)]
    sched.add(make_seq("d", range(2)))
    assert step(sched) == [("c", 5), ("d", 2)]
    assert step(sched) == [("c", 1), ("d", 1)]


def test_max_num_seqs():
    sched = make_sched(max_seqs=2)
    seqs = [make_seq(x, range(3)) for x in "abc"]
    for s in seqs:
        sched.add(s)
    assert step(sched) == [("a", 3), ("b", 3)]
    sched.finish(seqs[0], "length")
    assert step(sched) == [("b", 1), ("c", 3)]


def test_prefix_hit_applied_at_admission():
    sched = make_sched()
    model = FakeModel(sched.kv)
    a = make_seq("a", range(12))
    sched.add(a)
    step(sched, model)
    sched.finish(a, "stop")
    b = make_seq("b", list(range(12)) + [5])
    sched.add(b)
    assert step(sched, model) == [("b", 1)]           # 12 of 13 tokens came from the cache
    assert b.output_ids == [1000]
    c = make_seq("c", range(12))                       # the last token is always computed
    sched.add(c)
    assert step(sched, model) == [("b", 1), ("c", 4)]
    assert (sched.kv.prefix_queries, sched.kv.prefix_hits) == (12 + 13 + 12, 12 + 8)


def test_preemption_frees_the_newest_and_resumes_it_first():
    sched = make_sched(blocks=7, caching=False)       # blocks 1..6
    a, b, c = make_seq("a", range(8)), make_seq("b", range(8)), make_seq("c", range(4))
    for s in (a, b, c):
        sched.add(s)
    model = FakeModel(sched.kv)
    assert step(sched, model) == [("a", 8), ("b", 8), ("c", 4)]   # 2 + 2 + 1 blocks
    # a takes the last free block; b needs one too: c, the newest, is preempted
    assert step(sched, model) == [("a", 1), ("b", 1)]
    assert c.status is Status.WAITING and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert list(sched.waiting) == [c] and c.output_ids == [1000]     # its output is kept
    assert sched.num_preemptions == 1
    d = make_seq("d", range(1))
    sched.add(d)
    assert step(sched, model) == [("a", 1), ("b", 1)]   # FCFS: d may not overtake c
    sched.finish(a, "stop")
    # c recomputes prompt + output (5 tokens) and only then samples its 2nd token
    assert step(sched, model) == [("b", 1), ("c", 5), ("d", 1)]
    assert c.output_ids == [1000, 1001] and c.status is Status.RUNNING


def test_preemption_order_and_self_preemption():
    sched = make_sched(blocks=4, caching=False)       # blocks 1..3
    a, b = make_seq("a", range(4)), make_seq("b", range(8))
    sched.add(a)
    sched.add(b)
    model = FakeModel(sched.kv)
    assert step(sched, model) == [("a", 4), ("b", 8)]
    assert step(sched, model) == [("a", 1)]           # b preempted so that a grows
    assert list(sched.waiting) == [b]
    for _ in range(7):                                # a decodes until 12 tokens: 3 blocks
        assert step(sched, model) == [("a", 1)]
    # a needs a 4th block: no newer sequence is left, so it preempts itself and goes first
    assert step(sched, model) == []
    assert list(sched.waiting) == [a, b] and not sched.running and sched.kv.usage() == 0
    assert a.num_computed_tokens == 0 and len(a.output_ids) == 9 and sched.num_preemptions == 2


def test_abort_waiting_running_and_preempted():
    sched = make_sched(blocks=4, caching=False)
    a, b, c = make_seq("a", range(4)), make_seq("b", range(8)), make_seq("c", range(2))
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    step(sched)                                       # b is preempted, c waits behind it
    assert list(sched.waiting) == [b, c]
    sched.abort(c)
    assert c.finish_reason == "abort" and c.finished and list(sched.waiting) == [b]
    sched.abort(b)                                    # preempted, with output tokens
    assert not sched.waiting and b.status is Status.FINISHED
    sched.abort(a)                                    # running: its blocks are freed
    assert not sched.has_unfinished() and sched.kv.usage() == 0
    sched.abort(a)                                    # twice: nothing happens
    assert a.finish_reason == "abort"
    sched.check_integrity()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("windows", [(None,), (None, 8)])
def test_random_workload_keeps_every_invariant(seed, windows):
    """Shared prefixes, a small cache, a small budget, requests joining and finishing at
    random: the budget holds, every read slot holds the right token, and all finish."""
    rng = random.Random(seed)
    sched = make_sched(blocks=10, budget=rng.choice([5, 8, 16]), max_seqs=6, windows=windows)
    prefix = [rng.randrange(50) for _ in range(12)]
    run_random_workload(sched, rng, 80, lambda: prefix[:rng.randint(0, 12)] + [
        rng.randrange(50) for _ in range(rng.randint(1, 9))])
    assert sched.kv.usage() == 0


def run_random_workload(sched: Scheduler, rng: random.Random, steps: int, prompt) -> None:
    """Up to 12 requests join at random in the first 12 steps (prompt(): their ids), each
    finishing after a random number of tokens; after `steps` steps every one has finished with
    the right tokens and the scheduler is consistent."""
    model, seqs, want = FakeModel(sched.kv), [], {}
    for i in range(steps):
        if i < 12 and rng.random() < 0.7:
            s = make_seq(f"s{i}", prompt())
            seqs.append(s)
            want[s.seq_id] = rng.randint(1, 12)
            sched.add(s)
        step(sched, model)
        for s in list(sched.running):
            if len(s.output_ids) >= want[s.seq_id]:
                sched.finish(s, "length")
    assert not sched.has_unfinished(), f"{steps} steps should finish every request"
    for s in seqs:
        assert s.output_ids == [1000 + i for i in range(want[s.seq_id])]
    sched.check_integrity()


def test_bad_limits():
    kv = KVCacheManager([8], BS, [None])
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(kv, 4, 0)


# -- the latency target (step_time.py) ------------------------------------------------------
class FixedCost(StepTimeModel):
    """A step-time model that knows the truth: 5 ms + 1 ms a token + 1 ms a sampling row +
    0.01 ms per thousand attention pairs."""
    COEF = (0.005, 0.001, 0.00001, 0.001)

    def __init__(self):
        super().__init__()
        self.w = 1.0                                  # ready

    def coef(self):
        return self.COEF


def predicted(plan: SchedulerOutput) -> float:
    return FixedCost().predict(*step_features(plan))


def target_sched(target, budget=512, blocks=256, max_seqs=16) -> Scheduler:
    kv = KVCacheManager([blocks], BS, [None])
    return Scheduler(kv, max_seqs, budget, LatencyTarget.parse(target), FixedCost())


def decoding(sched: Scheduler, n: int, prompt_len: int = 6) -> list[Sequence]:
    seqs = [make_seq(f"d{i}", range(100 * i, 100 * i + prompt_len)) for i in range(n)]
    for s in seqs:
        sched.add(s)
    step(sched)                                       # nobody decodes yet: all in one step
    return seqs


def test_a_long_prompt_is_split_to_keep_each_step_within_the_target():
    sched = target_sched(30)                          # 30 ms
    decoders = decoding(sched, 8)
    long = make_seq("long", range(1000, 1300))
    sched.add(long)
    chunks = []
    while long.in_prefill:
        plan = sched.schedule()
        assert predicted(plan) <= 0.030 + 1e-9
        rows = {s.seq.seq_id: s.num_new_tokens for s in plan.scheduled}
        assert all(rows[d.seq_id] == 1 for d in decoders)        # every decoder got its token
        chunks.append(rows["long"])
        apply(plan)
    # 21 ms of decode rows leave 9 ms: chunks of 9 tokens, shrinking as attention grows
    assert sum(chunks) == 300 and chunks[0] == 8 and max(chunks) <= 9 and len(chunks) > 30
    assert long.output_ids == [1000]


def apply(plan: SchedulerOutput) -> None:
    for s in plan.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
        if s.samples:
            s.seq.output_ids.append(1000 + len(s.seq.output_ids))


def test_a_target_tighter_than_the_decode_rows_still_moves_prefill():
    sched = target_sched(10)                          # the 8 decode rows alone take 21 ms
    decoding(sched, 8)
    sched.add(make_seq("p", range(1000, 1040)))
    sizes = [dict(step(sched))["p"] for _ in range(5)]
    assert sizes == [MIN_PREFILL_TOKENS] * 5


def test_auto_target_follows_the_decode_step_and_nobody_decoding_gets_the_budget():
    sched = target_sched("auto", budget=64)
    sched.add(make_seq("a", range(200)))
    assert step(sched) == [("a", 64)]                 # no decode rows: the token budget alone
    for n, target in ((8, AUTO_FLOOR_S), (48, AUTO_RATIO * (0.005 + 0.002 * 48))):
        sched = target_sched("auto", budget=512, max_seqs=64)
        decoding(sched, n)
        sched.add(make_seq("long", range(1000, 1300)))
        plan = sched.schedule()
        # 8 decode rows take 21 ms: the floor; 48 take 101 ms: 1.25 x that
        assert sched._step.target_seconds == pytest.approx(target, rel=1e-3)
        assert predicted(plan) <= target + 1e-9 < predicted(plan) + 0.002   # filled to it
        assert plan.num_tokens < n + 100


def test_auto_takes_a_burst_in_steps_as_long_as_the_decode_steps_it_will_make():
    """40 prompts arrive beside 8 decoders: a step with prefill may take as long as the decode
    step of all 48 (not only 1.25x the 8 rows' or the floor; within AUTO_SEATED_MAX_S), so the
    batch fills in a few steps; with the seats full the waiting add nothing."""
    sched = target_sched("auto", budget=512, blocks=2048, max_seqs=48)
    decoding(sched, 8)
    burst = [make_seq(f"b{i}", range(2000 + 30 * i, 2000 + 30 * i + 20)) for i in range(40)]
    for s in burst:
        sched.add(s)
    pairs = 8 * attention_pairs(6 + 1, 1)               # the 8 decode rows'
    seated = FixedCost().predict(48, pairs + 40 * 20, 48)
    rule = max(AUTO_FLOOR_S, AUTO_RATIO * FixedCost().predict(8, pairs, 8))
    seated = min(seated, AUTO_SEATED_MAX_S)            # within 90 ms (3x the floor)
    plan = sched.schedule()
    assert sched._step.target_seconds == pytest.approx(seated, rel=1e-3) and seated > 2 * rule
    assert predicted(plan) <= seated + 1e-9 < predicted(plan) + 0.002
    steps = 1
    while any(s.in_prefill for s in burst) and steps < 100:
        apply(plan)
        plan = sched.schedule()
        steps += 1
    assert steps <= 30 and sched.num_preemptions == 0   # the old rule alone: 52 steps
    sched = target_sched("auto", budget=512, max_seqs=8)
    decoding(sched, 8)
    sched.add(make_seq("late", range(5000, 5300)))
    sched.schedule()
    assert sched._step.target_seconds == pytest.approx(AUTO_FLOOR_S)   # no seat: no say


def burst_of(n: int, at: float | None, prompt_len: int = 80) -> list[Sequence]:
    """n prompts that the engine took at `at` (None: arrival unknown)."""
    seqs = [make_seq(f"b{i}", range(10 ** 4 * (i + 1), 10 ** 4 * (i + 1) + prompt_len))
            for i in range(n)]
    for s in seqs:
        s.arrival_time = at
    return seqs


def admit(sched: Scheduler, seqs: list[Sequence]) -> tuple[int, list[tuple[float, ...]]]:
    """Steps until every one of seqs has its prompt computed, and (target, rule, seated step)
    of the steps that had a time limit while some of seqs waited."""
    steps, limits = 0, []
    while any(s.in_prefill for s in seqs):
        queued = bool(sched.waiting)
        plan = sched.schedule()
        budget = sched.budget
        if budget.limited and queued:
            limits.append((budget.target_seconds, budget.rule_seconds, budget.seated_seconds))
            assert predicted(plan) <= budget.target_seconds + 1e-9
        apply(plan)
        steps += 1
        assert steps < 500
    return steps, limits


def test_auto_admits_a_burst_in_steps_of_its_own_decode_step_times_the_burst_ratio():
    """64 prompts taken together: the rows admitted first are the burst's own, with no earlier
    cadence to keep, so a step may take BURST_RATIO x the decode step the burst will make;
    the burst is in within 2/3 of the steps it takes when its arrivals are not known (the
    rule alone: steps as long as that decode step)."""
    sched = target_sched("auto", budget=512, blocks=4096, max_seqs=64)
    for s in (burst := burst_of(64, at=100.0)):
        sched.add(s)
    steps, limits = admit(sched, burst)
    assert limits and all(t == pytest.approx(max(rule, BURST_RATIO * seated))
                          for t, rule, seated in limits)
    assert sum(t > rule for t, rule, _ in limits) > len(limits) / 2
    spread = target_sched("auto", budget=512, blocks=4096, max_seqs=64)
    for s in (same := burst_of(64, at=None)):
        spread.add(s)
    spread_steps, spread_limits = admit(spread, same)
    assert all(t == pytest.approx(rule) for t, rule, _ in spread_limits)
    assert 3 * steps <= 2 * spread_steps, (steps, spread_steps)
    assert sched.num_preemptions == spread.num_preemptions == 0


def burst_beside_decoders(decoders_at: list[float | None]) -> Scheduler:
    """Streams taken at decoders_at decode (one step of prompts each); then 40 prompts come,
    taken at 100.0. The scheduler has planned the first step after they came."""
    sched = target_sched("auto", budget=512, blocks=4096, max_seqs=64)
    for i, at in enumerate(decoders_at):
        seq = make_seq(f"d{i}", range(100 * i, 100 * i + 6))
        seq.arrival_time = at
        sched.add(seq)
    step(sched)                                       # nobody decodes yet: all in one step
    for s in burst_of(40, at=100.0):
        sched.add(s)
    plan = sched.schedule()
    assert sched.budget.limited and predicted(plan) <= sched.budget.target_seconds + 1e-9
    return sched


@pytest.mark.parametrize("before", [0.0, BURST_WINDOW_S * 0.8])
def test_streams_taken_with_the_burst_are_its_own(before):
    sched = burst_beside_decoders([100.0 - before] * 8)
    budget = sched.budget
    assert budget.seated_seconds == pytest.approx(AUTO_SEATED_MAX_S)     # 48 rows, capped
    assert budget.target_seconds == pytest.approx(BURST_RATIO * AUTO_SEATED_MAX_S)
    assert budget.rule_seconds < budget.target_seconds


@pytest.mark.parametrize("first", [None, 100.0 - BURST_WINDOW_S * 1.2, 50.0])
def test_a_stream_from_before_the_burst_keeps_the_rule(first):
    """One decoding stream that came before the burst (or whose arrival is unknown) keeps the
    rule's step for every row: its tokens had a cadence before the burst came."""
    sched = burst_beside_decoders([first] + [100.0] * 7)
    assert sched.budget.target_seconds == pytest.approx(sched.budget.rule_seconds)


def test_a_burst_larger_than_the_seats_is_none():
    """80 prompts for 64 seats: its first rows have a cadence by the time the rest find
    seats, so the rule holds from the start."""
    sched = target_sched("auto", budget=512, blocks=4096, max_seqs=64)
    for s in (burst := burst_of(80, at=100.0)):
        sched.add(s)
    _, limits = admit(sched, burst[:64])
    assert limits and all(t == pytest.approx(rule) for t, rule, _ in limits)


def test_a_preempted_sequence_in_the_queue_is_no_burst():
    sched = burst_beside_decoders([100.0] * 8)
    assert sched.budget.burst
    sched = target_sched("auto", budget=512, blocks=4096, max_seqs=64)
    decoders = burst_of(8, at=100.0, prompt_len=6)
    for s in decoders:
        sched.add(s)
    step(sched)
    sched._preempt(decoders[-1])                      # back in front of the queue
    sched.schedule()
    assert not sched.budget.burst
    assert sched.budget.target_seconds == pytest.approx(sched.budget.rule_seconds)


def test_a_burst_whose_decode_step_is_under_the_floor_keeps_the_floor():
    """4 streams and 2 prompts, taken together: the seated step (6 rows, 17 ms) times 1.5 is
    under the 30 ms floor, so the step is the rule's."""
    sched = target_sched("auto", budget=512, blocks=4096, max_seqs=64)
    for i in range(4):
        seq = make_seq(f"d{i}", range(100 * i, 100 * i + 6))
        seq.arrival_time = 100.0
        sched.add(seq)
    step(sched)
    for s in burst_of(2, at=100.0, prompt_len=300):
        sched.add(s)
    sched.schedule()
    budget = sched.budget
    assert budget.burst and BURST_RATIO * budget.seated_seconds < AUTO_FLOOR_S
    assert budget.target_seconds == pytest.approx(AUTO_FLOOR_S) == budget.rule_seconds


def test_a_fixed_target_holds_through_a_burst():
    sched = target_sched(300, budget=512, blocks=4096, max_seqs=64)
    for s in (burst := burst_of(64, at=100.0)):
        sched.add(s)
    _, limits = admit(sched, burst)
    assert len(limits) > 5 and {t for t, *_ in limits} == {0.300}


@pytest.mark.parametrize("decoders", [8, 20, 30])
def test_the_seated_step_is_bounded_by_a_constant_not_by_the_decode_rows(decoders):
    """Long prompts fill the free seats of 64 beside n decoders. The step the queue will make
    counts up to AUTO_SEATED_MAX_S, whatever n: a bound proportional to the decode step (3x
    the rest of the rule until 2026-11-30: 169 ms at 20 rows, 244 ms at 30) grows as admitted
    prompts join the decode rows, which lengthens the next step, which admits more (at 64
    streams the steps climbed from 60 to 200-370 ms in one run)."""
    sched = target_sched("auto", budget=512, blocks=8192, max_seqs=64)
    decoding(sched, decoders)
    for i in range(64 - decoders):
        sched.add(make_seq(f"p{i}", range(10 ** 5 * (i + 1), 10 ** 5 * (i + 1) + 1500)))
    plan = sched.schedule()
    decode_s = FixedCost().predict(decoders, decoders * (6 + 1), decoders)
    seated_s = FixedCost().predict(64, decoders * (6 + 1) + (64 - decoders) * 1500, 64)
    assert seated_s > AUTO_SEATED_MAX_S                 # the full batch's step: 133-134 ms
    rule = max(AUTO_FLOOR_S, AUTO_RATIO * decode_s, AUTO_SEATED_MAX_S)
    assert sched._step.rule_seconds == pytest.approx(rule, rel=1e-6)
    assert sched._step.target_seconds == pytest.approx(rule, rel=1e-6)
    assert predicted(plan) <= rule + 1e-9


def test_target_off_is_the_token_budget_alone():
    assert LatencyTarget.parse("off") is None and LatencyTarget.parse(0) is None
    sched = target_sched("off")
    assert sched.target is None
    decoding(sched, 8)
    sched.add(make_seq("long", range(1000, 1300)))
    assert dict(step(sched))["long"] == 300         # the whole prompt in one step


def test_decode_rows_keep_their_tokens_within_the_token_budget():
    sched = target_sched(1000, budget=12)             # time is no limit here, tokens are
    decoders = decoding(sched, 4, prompt_len=2)
    sched.add(make_seq("p", range(1000, 1100)))
    for _ in range(4):
        got = dict(step(sched))
        assert all(got[d.seq_id] == 1 for d in decoders) and got["p"] == 8


def test_target_parse_refuses_bad_values():
    assert LatencyTarget.parse(None) == LatencyTarget() == LatencyTarget.parse("auto")
    assert LatencyTarget.parse("40").seconds == 0.040
    assert LatencyTarget.parse(12.5).seconds == 0.0125
    for bad in ("fast", -1, float("nan"), True, [3]):
        with pytest.raises(ValueError, match="target_itl_ms"):
            LatencyTarget.parse(bad)


def test_step_time_model_recovers_a_linear_cost():
    m = StepTimeModel()
    assert not m.ready and m.chunk_tokens(1.0, 0) == 0
    m.add(16, attention_pairs(0, 16), 1, 0.005 + 0.016 + 0.001)
    assert m.coef()[0] == pytest.approx(0, abs=1e-9)   # one step: all of it per token (prior)
    assert m.coef()[1] == pytest.approx(0.022 / 16, rel=1e-3)
    rng = random.Random(0)
    for _ in range(300):
        rows = rng.randint(1, 32)
        chunk, start = rng.choice([0, rng.randint(1, 256)]), rng.randint(0, 2000)
        pairs = sum(attention_pairs(start, 1) for _ in range(rows)) + attention_pairs(start, chunk)
        m.add(rows + chunk, pairs, rows, 0.005 + 0.001 * (rows + chunk) + 0.001 * rows
              + 1e-8 * pairs)
    base, per_token, per_pair, per_row = m.coef()
    assert base == pytest.approx(0.005, rel=0.05) and per_token == pytest.approx(0.001, rel=0.05)
    assert per_row == pytest.approx(0.001, rel=0.05) and per_pair == pytest.approx(1e-5, rel=0.1)
    n = m.chunk_tokens(0.05, 1000)
    assert m.chunk_seconds(1000, n) <= 0.05 < m.chunk_seconds(1000, n + 1)


def test_window_pairs_count_the_keys_a_sliding_window_reads():
    for start in range(0, 40, 3):
        for n in range(1, 30, 4):
            for w in (1, 5, 16, 64):
                assert window_pairs(start, n, w) == sum(min(p + 1, w)
                                                        for p in range(start, start + n))
    assert window_pairs(0, 10, 100) == attention_pairs(0, 10)
    span = AttentionSpan.of_layers([8, None, 8, 8, None, 8])
    assert span.layers == ((None, 2), (8, 4))
    assert span.pairs(100, 4) == pytest.approx(
        (2 * attention_pairs(100, 4) + 4 * window_pairs(100, 4, 8)) / 6)
    assert span.pairs(0, 5) == attention_pairs(0, 5)           # inside the window: the same
    whole = WHOLE_CONTEXT.pairs(7, 3)
    assert whole == attention_pairs(7, 3) and isinstance(whole, int)
    for bad in ([], [0], [None, -4]):
        with pytest.raises(ValueError, match="windows"):
            AttentionSpan.of_layers(bad)


@pytest.mark.parametrize("windows, worse", [
    ([None] * 3 + [512] * 15, 5),        # Gemma 3: 3 layers whole, 15 with 512-key windows
    ([1024] * 8, 20),                    # Mistral-like: every layer slides
])
def test_a_window_aware_model_predicts_a_sliding_window_cost(windows, worse):
    """A step cost that follows what the kernels read (their windows) is fitted exactly when
    pairs are counted per window; counted as if every layer saw the whole context (the model
    before), the fit errs `worse` times as much or more."""
    span = AttentionSpan.of_layers(windows)
    rng = random.Random(0)

    def steps(k):
        out = []
        for _ in range(k):
            rows = [rng.randint(0, 8000) for _ in range(rng.randint(0, 16))]
            start, chunk = rng.randint(0, 8000), rng.choice([0, rng.randint(1, 256)])
            seqs = [(p, 1) for p in rows] + ([(start, chunk)] if chunk else [])
            if seqs:
                out.append((seqs, len(rows)))
        return out

    def features(model, seqs, rows):
        return sum(n for _, n in seqs), sum(model.pairs(s, n) for s, n in seqs), rows

    def truth(seqs, rows):
        pairs = sum(span.pairs(s, n) for s, n in seqs)
        return 0.03 + 0.003 * sum(n for _, n in seqs) + 0.002 * rows + 2e-6 * pairs

    p90 = {}
    for name, model in (("windows", StepTimeModel(span)), ("whole", StepTimeModel())):
        for seqs, rows in steps(300):
            model.add(*features(model, seqs, rows), truth(seqs, rows))
        errors = sorted(abs(model.predict(*features(model, seqs, rows)) / truth(seqs, rows) - 1)
                        for seqs, rows in steps(200))
        p90[name] = errors[len(errors) * 9 // 10]
        if name == "windows":
            assert errors[-1] < 0.02
    assert p90["whole"] > worse * p90["windows"], p90
    m = StepTimeModel(span)
    for seqs, rows in steps(300):
        m.add(*features(m, seqs, rows), truth(seqs, rows))
    for start in (0, 300, 500, 511, 512, 700, 1023, 1024, 3000):     # across the windows' edge
        for seconds in (0.01, 0.1, 1.0):
            n = m.chunk_tokens(seconds, start)
            assert m.chunk_seconds(start, n) <= seconds < m.chunk_seconds(start, n + 1)


@pytest.mark.parametrize("seed", range(3))
def test_random_workload_with_a_target_keeps_every_invariant(seed):
    rng = random.Random(seed)
    kv = KVCacheManager([10], BS, [None])
    sched = Scheduler(kv, 6, rng.choice([8, 16]), LatencyTarget.parse(rng.choice([8, 15, "auto"])),
                      FixedCost())
    run_random_workload(sched, rng, 150,
                        lambda: [rng.randrange(50) for _ in range(rng.randint(1, 20))])
