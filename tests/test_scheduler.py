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
    model, prefix = FakeModel(sched.kv), [rng.randrange(50) for _ in range(12)]
    seqs, want = [], {}
    for i in range(80):
        if i < 12 and rng.random() < 0.7:
            s = make_seq(f"s{i}", prefix[:rng.randint(0, 12)] + [rng.randrange(50)
                                                                for _ in range(rng.randint(1, 9))])
            seqs.append(s)
            want[s.seq_id] = rng.randint(1, 12)
            sched.add(s)
        step(sched, model)
        for s in list(sched.running):
            if len(s.output_ids) >= want[s.seq_id]:
                sched.finish(s, "length")
    assert not sched.has_unfinished(), "80 steps should finish every request"
    for s in seqs:
        assert s.output_ids == [1000 + i for i in range(want[s.seq_id])]
    assert sched.kv.usage() == 0
    sched.check_integrity()


def test_bad_limits():
    kv = KVCacheManager([8], BS, [None])
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(kv, 4, 0)
