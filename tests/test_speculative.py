"""Speculative decoding (engine/speculative.py): the pure-Python parts on their own (n-gram
index, suffix table, acceptance, draft length, step cost, config, the scheduler with drafts),
then the invariant on the real models: with speculation on, every output is the same bits as
without (token ids, logprobs, cumulative logprob, text, finish and stop reasons), greedy and
seeded sampling, alone and batched, with prefix caching, chunked prefill, stop strings,
max/min tokens, penalties, n > 1, structured output and cancellation. Each model test also
checks that drafts were verified and some kept, so that it cannot pass vacuously."""
from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace

import pytest

from ostinato.engine.kv_cache import KVCacheManager
from ostinato.engine.scheduler import Scheduler
from ostinato.engine.sequence import ScheduledSeq, Sequence, Status
from ostinato.engine.speculative import (Acceptance, NgramIndex, SpeculativeConfig, Speculator,
                                         StepCost, SuffixTable, draft_length, lookup_sizes)
from modelfiles import model_file


# =============================================================================================
# NgramIndex
# =============================================================================================
def brute_propose(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The rule, spelled out: the longest n-gram (of the sizes looked up) ending `tokens` that
    also ends at an earlier position; the latest such position; the (up to k) tokens after it."""
    n_tok = len(tokens)
    for n in lookup_sizes(n_min, n_max):
        if n > n_tok:
            continue
        tail = tokens[n_tok - n:]
        ends = [e for e in range(n, n_tok) if tokens[e - n: e] == tail]
        if ends:
            e = max(ends)
            return tokens[e: min(e + k, n_tok)]
    return []


def test_lookup_sizes_double_from_the_shortest():
    assert lookup_sizes(2, 16) == [16, 8, 4, 2]
    assert lookup_sizes(3, 10) == [10, 6, 3]
    assert lookup_sizes(2, 2) == [2]
    assert lookup_sizes(1, 5) == [5, 4, 2, 1]


def test_ngram_latest_occurrence_wins():
    tokens = [1, 2, 3, 1, 2, 4, 7, 1, 2]
    assert NgramIndex(2, 2).propose(tokens, 3) == [4, 7, 1]      # (1, 2) last ended at 5
    assert NgramIndex(2, 2).propose(tokens, 1) == [4]


def test_ngram_longest_match_first():
    #         the 3-gram (1,2,3) ends at 3 ........ the 2-gram (2,3) last ends at 7
    tokens = [1, 2, 3, 50, 9, 2, 3, 60, 1, 2, 3]
    assert NgramIndex(2, 3).propose(tokens, 2) == [50, 9]
    assert NgramIndex(2, 2).propose(tokens, 2) == [60, 1]        # 2-grams only: the latest
    assert NgramIndex(1, 1).propose(tokens, 1) == [60]           # the (3,) before the end


def test_ngram_nothing_without_a_match():
    assert NgramIndex(2, 5).propose([1, 2, 3, 4, 5, 6], 4) == []
    assert NgramIndex(2, 5).propose([7], 4) == []
    assert NgramIndex(1, 3).propose([], 4) == []
    # the tail itself is no earlier occurrence
    assert NgramIndex(2, 2).propose([5, 6], 4) == []


def test_ngram_k_bounds():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    idx = NgramIndex(2, 2)
    for k in range(1, 10):
        got = idx.propose(tokens, k)
        assert got == tokens[2: 2 + k][: len(tokens) - 2] and len(got) <= k
    # a match right before the end proposes only what exists
    assert NgramIndex(1, 1).propose([4, 4], 8) == [4]
    assert NgramIndex(2, 2).propose([4, 4, 4], 8) == [4]


@pytest.mark.parametrize("seed", range(6))
def test_ngram_incremental_equals_fresh_and_brute_force(seed):
    rng = random.Random(seed)
    n_min = rng.randint(1, 3)
    n_max = rng.randint(n_min, 6)
    alphabet = rng.randint(2, 6)                 # small: many repeats
    tokens: list[int] = [rng.randrange(alphabet) for _ in range(rng.randint(1, 4))]
    grown = NgramIndex(n_min, n_max)
    while len(tokens) < 300:
        k = rng.randint(1, 12)
        want = brute_propose(tokens, k, n_min, n_max)
        assert grown.propose(tokens, k) == want, (n_min, n_max, len(tokens), k)
        assert NgramIndex(n_min, n_max).propose(tokens, k) == want
        tokens += [rng.randrange(alphabet) for _ in range(rng.choice([1, 1, 1, 2, 5]))]


# =============================================================================================
# SuffixTable
# =============================================================================================
def test_suffix_table_proposes_what_followed_in_added_text():
    t = SuffixTable(2, 3, follow=4)
    t.add([1, 2, 3, 4, 5, 6, 7, 8])
    assert t.propose([9, 9, 2, 3], 2) == [4, 5]
    assert t.propose([9, 9, 2, 3], 10) == [4, 5, 6, 7]           # `follow` tokens kept
    assert t.propose([9, 1, 2, 3], 3) == [4, 5, 6]               # the 3-gram
    assert t.propose([9, 9, 9], 3) == []
    assert t.propose([3], 3) == []                               # shorter than n_min
    t.add([50, 2, 3, 60, 61])                                    # the latest text wins
    assert t.propose([0, 2, 3], 3) == [60, 61]
    assert t.propose([1, 2, 3], 3) == [4, 5, 6]                  # the longer match still


def test_suffix_table_is_bounded():
    t = SuffixTable(1, 2, max_entries=50)
    rng = random.Random(0)
    for _ in range(40):
        t.add([rng.randrange(1000) for _ in range(30)])
        assert len(t.table) <= 50
    last = [10_001, 10_002, 10_003, 10_004]
    t.add(last)
    assert len(t.table) == 50
    assert t.propose([10_001, 10_002], 2) == [10_003, 10_004]   # the newest entries stay


# =============================================================================================
# Acceptance, draft_length, StepCost
# =============================================================================================
def test_acceptance_falls_rises_and_drifts_back():
    a = Acceptance()
    assert a.alpha == pytest.approx(Acceptance.PRIOR)
    seen = [a.alpha]
    for _ in range(6):
        a.record(4, 0)
        seen.append(a.alpha)
    assert all(x > y for x, y in zip(seen, seen[1:])), seen
    low = a.alpha
    assert low < 0.2
    # idle: back towards the prior, monotonically, never past it
    gaps = []
    for _ in range(200):
        a.idle()
        gaps.append(Acceptance.PRIOR - a.alpha)
    assert all(g >= 0 for g in gaps)
    assert all(x >= y for x, y in zip(gaps, gaps[1:]))
    assert gaps[-1] < 0.05 < Acceptance.PRIOR - low
    b = Acceptance()
    seen = [b.alpha]
    for _ in range(6):
        b.record(4, 4)
        seen.append(b.alpha)
    assert all(x < y for x, y in zip(seen, seen[1:])), seen
    for _ in range(100):
        b.record(8, 8)
    assert 0.95 < b.alpha <= 0.99                                # never 1: capped
    c = Acceptance()
    c.record(4, 2)                                               # kept 2, then a rejection
    assert c.tries == 3 and c.kept == 2


def test_draft_length():
    for k in (1, 4, 16):
        assert draft_length(0.9, 0.0, k) == k
        assert draft_length(0.9, -1.0, k) == k
        assert draft_length(0.99, 1.0, k) == 0
        assert draft_length(0.99, 1.5, k) == 0
        assert draft_length(0.5, 0.5, k) == 0
        assert draft_length(0.4, 0.5, k) == 0
    for price in (0.01, 0.05, 0.2, 0.6):
        lengths = [draft_length(a / 100, price, 64) for a in range(1, 100)]
        assert all(x <= y for x, y in zip(lengths, lengths[1:])), price
        for a in (0.3, 0.55, 0.7, 0.85, 0.95):
            n = draft_length(a, price, 64)
            if 0 < n < 64:        # the n-th draft is worth it, the next is not
                assert a ** n >= price * (1 - 1e-9) and a ** (n + 1) < price
    assert draft_length(0.95, 0.01, 5) == 5                       # bounded by k_max


def test_step_cost_recovers_the_fit_and_prices_against_plain_decode():
    base, per = 0.004, 0.0002
    c = StepCost()
    rng = random.Random(1)
    for _ in range(300):
        tokens = rng.randint(1, 128)
        c.add(tokens, seconds=base + per * tokens)
    assert c.per_token() == pytest.approx(per, rel=1e-6)
    assert c.base() == pytest.approx(base, rel=1e-6)
    # a token's price: its time over the time a plain step of the batch takes per token
    assert c.token_price(1) == pytest.approx(per / (base + per))
    assert c.token_price(16) == pytest.approx(16 * per / (base + 16 * per))
    assert c.token_price(1, 0.001) == pytest.approx((per + 0.001) / (base + per))
    assert c.token_price(1) < c.token_price(16) < c.token_price(64) < 1
    # a step bound by its tokens (no base time): a token costs a whole emitted token
    bound = StepCost()
    for t in range(1, 100):
        bound.add(t, seconds=0.001 * t)
    assert bound.token_price(16) == pytest.approx(1.0)


def test_step_cost_prior_until_the_token_count_varies():
    c = StepCost()
    assert c.per_token() == 0.0 and c.token_price(1) == 0.0
    for _ in range(20):
        c.add(10, seconds=0.01)
    assert c.per_token() == pytest.approx(StepCost.PRIOR_SHARE * 0.01)
    # a negative measured slope is floored to a tenth of the prior
    d = StepCost()
    for t in range(1, 60):
        d.add(t, seconds=1.0 - 0.01 * t)
    assert d.per_token() > 0
    # noise steeper than the mean time per token is bounded by it
    e = StepCost()
    for t in [1, 2] * 30:
        e.add(t, seconds=0.001 if t == 1 else 0.5)
    assert e.per_token() <= e.sy / e.sx + 1e-12


# =============================================================================================
# SpeculativeConfig
# =============================================================================================
@pytest.mark.parametrize("kw, match", [
    ({"method": "medusa"}, "method"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 65}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 0}, "n-gram"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 3}, "n-gram"),
    ({"prompt_lookup_max": 65}, "n-gram"),
    ({"method": "draft"}, "draft model"),
    ({"method": "ngram", "draft_model": "x.gguf"}, "draft model"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig(**kw)


def test_config_parse():
    assert SpeculativeConfig.parse(None) is None
    c = SpeculativeConfig("suffix", 3)
    assert SpeculativeConfig.parse(c) is c
    assert SpeculativeConfig.parse("ngram", num_speculative_tokens=None) == SpeculativeConfig()
    assert SpeculativeConfig.parse("ngram", num_speculative_tokens=5).num_speculative_tokens == 5
    SpeculativeConfig(num_speculative_tokens=64, prompt_lookup_min=16, prompt_lookup_max=16)
    with pytest.raises(ValueError, match="method"):     # before any model is read
        from ostinato import LLM
        LLM("/nonexistent/model.gguf", speculative="lookahead")
    with pytest.raises(ValueError, match="draft"):
        Speculator(SpeculativeConfig("ngram"), model_proposer=object())


# =============================================================================================
# Speculator.propose on plain sequences
# =============================================================================================
def plain_seq(seq_id: str, prompt, max_tokens=1000, output=()) -> Sequence:
    params = SimpleNamespace(prompt_logprobs=None, pooling=None)
    seq = Sequence(seq_id, seq_id, 0, list(prompt), params, max_tokens=max_tokens)
    seq.output_ids = list(output)
    return seq


def test_propose_fills_drafts_within_room_and_only_for_decoding_sequences():
    spec = Speculator(SpeculativeConfig("ngram", 8, adaptive=False))
    pattern = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    a = plain_seq("a", pattern * 2, output=[5, 6])
    a.num_computed_tokens = a.num_tokens - 1                    # decoding
    b = plain_seq("b", pattern * 2, max_tokens=5, output=[5, 6])
    b.num_computed_tokens = b.num_tokens - 1                    # room: 5 - 2 - 1 = 2
    c = plain_seq("c", pattern * 2)
    c.num_computed_tokens = 3                                   # still in prefill
    d = plain_seq("d", pattern * 2, max_tokens=3, output=[5, 6])
    d.num_computed_tokens = d.num_tokens - 1                    # no room
    e = plain_seq("e", [1, 2, 3, 4], output=[9])
    e.num_computed_tokens = e.num_tokens - 1                    # nothing to match
    spec.propose([a, b, c, d, e])
    assert a.draft_ids == pattern[2:10]
    assert b.draft_ids == [7, 8]
    assert c.draft_ids == [] and d.draft_ids == [] and e.draft_ids == []


def test_suffix_method_drafts_from_finished_requests():
    spec = Speculator(SpeculativeConfig("suffix", 4, adaptive=False))
    done = plain_seq("done", [1, 2, 3], output=[40, 41, 42, 43, 44, 45])
    spec.finished(done)
    s = plain_seq("s", [7, 7, 40, 41])
    s.num_computed_tokens = s.num_tokens - 1
    spec.propose([s])
    assert s.draft_ids == [42, 43, 44, 45]


def test_speculator_record_counts():
    spec = Speculator(SpeculativeConfig("ngram", 4))
    s = plain_seq("s", [1])
    spec.record(s, 4, 2)
    spec.record(s, 3, 3)
    spec.record(s, 2, 0)
    st = spec.stats
    assert (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens) == (3, 9, 5)
    assert st.accepted_per_pos == [2, 2, 1, 0]
    assert st.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert (s.num_draft_tokens, s.num_accepted_tokens) == (9, 5)


# =============================================================================================
# Scheduler with draft tokens
# =============================================================================================
BS = 4


def make_sched(blocks=64, budget=64, max_seqs=16, caching=False) -> Scheduler:
    return Scheduler(KVCacheManager([blocks], BS, [None], caching), max_seqs, budget)


def step(sched: Scheduler, keep: dict[str, int] | None = None) -> list[tuple[str, int, list]]:
    """One engine step as the engine does it: a sampling sequence gets one token plus the
    first keep[seq_id] of its draft (all of it by default); the drafts are then cleared."""
    plan = sched.schedule()
    assert plan.num_tokens <= sched.max_num_batched_tokens
    out = []
    for s in plan.scheduled:
        seq = s.seq
        assert s.start == seq.num_computed_tokens and s.num_new_tokens > 0
        assert len(s.token_ids) == s.num_new_tokens
        kept = s.draft[: (keep or {}).get(seq.seq_id, len(s.draft))]
        seq.num_computed_tokens += s.num_new_tokens - len(s.draft) + len(kept)
        if s.samples:
            seq.output_ids += [1000 + len(seq.output_ids)] if not kept else []
            seq.output_ids += kept + ([2000] if kept else [])
        out.append((seq.seq_id, s.num_new_tokens, list(s.draft)))
    for seq in sched.running:
        seq.draft_ids = []
    sched.check_integrity()
    return out


def decoding(sched: Scheduler, *seqs: Sequence) -> None:
    for s in seqs:
        sched.add(s)
    step(sched)                                       # prefill; each samples its first token
    assert all(s.num_computed_tokens == s.num_tokens - 1 for s in seqs)


def test_scheduled_seq_samples_and_token_ids_with_a_draft():
    seq = plain_seq("a", [1, 2, 3], output=[4])
    seq.num_computed_tokens = 3
    s = ScheduledSeq(seq, 4, 3, [[1]], [7, 8, 9])
    assert s.samples and s.token_ids == [4, 7, 8, 9]
    s = ScheduledSeq(seq, 2, 3, [[1]], [7])                    # draft cut to one token
    assert s.samples and s.token_ids == [4, 7]
    s = ScheduledSeq(seq, 1, 3, [[1]])
    assert s.samples and s.token_ids == [4]
    seq.num_computed_tokens = 0
    s = ScheduledSeq(seq, 2, 0, [[1]])                          # a prefill chunk
    assert not s.samples and s.token_ids == [1, 2]


def test_drafts_count_in_the_token_budget():
    sched = make_sched(budget=10)
    a, b = plain_seq("a", range(3)), plain_seq("b", range(10, 13))
    decoding(sched, a, b)
    a.draft_ids, b.draft_ids = [7, 8, 9], [5, 6]
    plan = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens, s.draft) for s in plan.scheduled] == \
        [("a", 4, [7, 8, 9]), ("b", 3, [5, 6])]
    assert plan.num_tokens == 7
    assert plan.scheduled[0].token_ids == [a.all_ids[-1], 7, 8, 9]
    assert all(s.samples for s in plan.scheduled)


def test_drafts_are_cut_by_the_budget():
    sched = make_sched(budget=6)
    a, b, c = plain_seq("a", range(2)), plain_seq("b", range(2)), plain_seq("c", range(2))
    decoding(sched, a, b, c)
    a.draft_ids, b.draft_ids, c.draft_ids = [1, 2, 3], [4, 5, 6], [7, 8]
    # a takes 4; b gets the 2 left: its real token and 1 draft token; c gets nothing
    assert step(sched) == [("a", 4, [1, 2, 3]), ("b", 2, [4])]
    assert a.output_ids[-4:] == [1, 2, 3, 2000] and b.output_ids[-2:] == [4, 2000]
    assert len(c.output_ids) == 1
    assert step(sched) == [("a", 1, []), ("b", 1, []), ("c", 1, [])]


def test_a_budget_of_one_leaves_no_room_for_a_draft():
    sched = make_sched(budget=1)
    a = plain_seq("a", [1])
    decoding(sched, a)
    a.draft_ids = [5, 6, 7]
    assert step(sched) == [("a", 1, [])]


def test_rejected_drafts_are_computed_again_as_real_tokens():
    sched = make_sched(budget=64)
    a = plain_seq("a", range(5))
    decoding(sched, a)
    a.draft_ids = [1, 2, 3, 4]
    assert step(sched, keep={"a": 1}) == [("a", 5, [1, 2, 3, 4])]
    # the token sampled and the kept draft token are in; the correction (2000) is not yet
    assert a.output_ids[-2:] == [1, 2000]
    assert a.num_computed_tokens == a.num_tokens - 1
    assert step(sched) == [("a", 1, [])]


def test_drafts_are_dropped_not_preempting_when_blocks_run_short():
    # blocks 1..4 (16 slots); a: 5 tokens + b: 6 tokens after their first step, 3 blocks used
    sched = make_sched(blocks=5, budget=64)
    a, b = plain_seq("a", range(4)), plain_seq("b", range(5))
    decoding(sched, a, b)
    assert (a.num_tokens, b.num_tokens) == (5, 6)
    # a computes position 4, in a 2nd block (the free one), and wants 8 draft tokens: 2
    # blocks more than there are. Without the draft nothing is short: the draft goes.
    a.draft_ids = list(range(100, 108))
    b.draft_ids = [200, 201]                           # fits in b's block 2 + the free one
    got = step(sched)
    assert got == [("a", 1, []), ("b", 3, [200, 201])]
    assert sched.num_preemptions == 0 and b.status is Status.RUNNING
    assert a.draft_ids == [] and not sched.waiting


def test_a_draft_never_preempts_a_newer_sequence():
    sched = make_sched(blocks=4, budget=64)             # blocks 1..3
    a, b = plain_seq("a", range(3)), plain_seq("b", range(7))
    decoding(sched, a, b)                               # a: 1 block, b: 2 blocks
    a.draft_ids = [1, 2, 3, 4, 5]                       # would need a 2nd block: none free
    assert step(sched) == [("a", 1, []), ("b", 1, [])]
    assert sched.num_preemptions == 0


def test_drafts_are_cleared_on_preemption():
    sched = make_sched(blocks=4, budget=64)             # blocks 1..3
    a, b = plain_seq("a", range(4)), plain_seq("b", range(7))
    decoding(sched, a, b)                               # a: 1 block, b: 2 blocks, none free
    a.draft_ids, b.draft_ids = [8], [9, 9]
    # a's next token needs a 2nd block: its draft goes first, then b (the newest) is preempted
    assert step(sched) == [("a", 1, [])]
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    assert b.status is Status.WAITING and b.draft_ids == [] and b.num_computed_tokens == 0
    assert len(b.output_ids) == 1                       # its output is kept


# =============================================================================================
# The real models: speculation on == off, bit for bit
# =============================================================================================
model = pytest.mark.model
MODELS = {"smollm": "smollm2-135m-instruct", "gemma": "gemma3-270m",
          "qwen": "qwen2.5-coder-0.5b-instruct"}
STRESS = SpeculativeConfig("ngram", 16, adaptive=False)       # the full 16 whenever it can
ADAPTIVE = SpeculativeConfig("ngram", 8)

CODE = ("def merge(left, right):\n    out = []\n    i = j = 0\n"
        "    while i < len(left) and j < len(right):\n"
        "        if left[i] <= right[j]:\n            out.append(left[i])\n            i += 1\n"
        "        else:\n            out.append(right[j])\n            j += 1\n"
        "    return out + left[i:] + right[j:]\n")
POEM = ("The river runs beneath the stone bridge, past the mill and the old oak tree, "
        "where the children of the village gather every summer evening to watch the swallows "
        "return to their nests under the eaves of the church.")
TEXTS = [CODE, POEM,
         "Shopping list: seven apples, two loaves of rye bread, a jar of honey, four candles, "
         "a bag of flour, green tea, and a bottle of olive oil.",
         "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
         "    def push(self, x):\n        self.items.append(x)\n\n"
         "    def pop(self):\n        return self.items.pop()\n"]
FREE = ["Write a short story about a dragon who learns to bake bread.",
        "Explain why the sky is blue to a ten year old.",
        "List five uses of a paperclip.",
        "What are the main differences between Python and Rust?"]

_built: dict[tuple, object] = {}
# every core (up to 4): the kernels give the same bits on any thread count, so the invariant
# is the same one; on 1 thread this file took 318 s alone on a 2-core machine
THREADS = min(4, len(os.sched_getaffinity(0)))


def make(name: str, spec=None, **knobs):
    """LLM(model, **knobs), speculative or not, built once per module."""
    from ostinato import LLM
    knobs = {"max_model_len": 1024, "kv_cache_gb": 0.1, "threads": THREADS, **knobs}
    key = (name, spec, tuple(sorted(knobs.items())))
    if key not in _built:
        _built[key] = LLM(model_file(MODELS[name]), speculative=spec, **knobs)
    return _built[key]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _built.clear()


def echo_prompt(llm, text: str) -> list[int]:
    return llm.chat_prompt_ids([{"role": "user", "content":
                                 "Copy the following text exactly, with nothing before or "
                                 f"after it:\n\n{text}"}])


def free_prompt(llm, text: str) -> list[int]:
    return llm.chat_prompt_ids([{"role": "user", "content": text}])


def raw_echo(llm, text: str) -> list[int]:
    """The text twice and its start again: a base model goes on copying."""
    return llm.tokenize(f"{text}\n\n{text}\n\n{text[:40]}")


def mixed_prompts(llm, n: int) -> list[list[int]]:
    kinds = [lambda t: echo_prompt(llm, t), lambda t: free_prompt(llm, t),
             lambda t: raw_echo(llm, t)]
    out = []
    for i in range(n):
        kind = i % 3
        pool = FREE if kind == 1 else TEXTS
        out.append(kinds[kind](pool[(i // 3) % len(pool)]))
    return out


def greedy(n: int, **kw):
    from ostinato import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def sampled(n: int, seed: int, **kw):
    from ostinato import SamplingParams
    return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=n, **kw)


class Counted:
    """The speculator's counters over a block of work."""

    def __init__(self, llm):
        self.st = llm.engine.speculator.stats
        self.start = (self.st.num_drafts, self.st.num_draft_tokens, self.st.num_accepted_tokens)

    @property
    def delta(self) -> tuple[int, int, int]:
        st = self.st
        return tuple(b - a for a, b in zip(self.start, (st.num_drafts, st.num_draft_tokens,
                                                        st.num_accepted_tokens)))

    def assert_used(self, rejected: bool = False) -> None:
        drafts, drafted, accepted = self.delta
        assert drafts > 0 and drafted > 0 and accepted > 0, f"no draft was kept: {self.delta}"
        if rejected:
            assert drafted > accepted, f"no draft token was rejected: {self.delta}"


def _first_diff(a: list, b: list):
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return min(len(a), len(b)) if len(a) != len(b) else None


def assert_same(got, want, label: str = "") -> None:
    """Every request's every choice: the same bits (speculative `got`, plain `want`)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g.outputs) == len(w.outputs), f"{label} request {i}: choices"
        for c, d in zip(g.outputs, w.outputs):
            where = f"{label} request {i} choice {c.index}"
            j = _first_diff(c.token_ids, d.token_ids)
            assert c.token_ids == d.token_ids, (
                f"{where}: tokens differ first at position {j}: "
                f"{c.token_ids[j:j + 4]} (spec) vs {d.token_ids[j:j + 4]} (plain); "
                f"common text {d.text[:200]!r}")
            if d.logprobs is not None or c.logprobs is not None:
                j = _first_diff(c.logprobs or [], d.logprobs or [])
                assert c.logprobs == d.logprobs, (
                    f"{where}: logprobs differ first at position {j}: "
                    f"{c.logprobs[j] if j < len(c.logprobs) else None} vs "
                    f"{d.logprobs[j] if j < len(d.logprobs) else None}")
            assert c.cumulative_logprob == d.cumulative_logprob, where
            assert c.text == d.text, where
            assert (c.finish_reason, c.stop_reason) == (d.finish_reason, d.stop_reason), where


def on_off(name: str, prompts, params, spec=STRESS, label="", **knobs):
    """Run prompts on the plain and the speculative LLM; assert the same bits; return the
    speculative outputs and its counters."""
    plain, fast = make(name, **knobs), make(name, spec, **knobs)
    want = plain.generate(prompts, params)
    counted = Counted(fast)
    got = fast.generate(prompts, params)
    assert_same(got, want, label)
    return got, counted


@model
@pytest.mark.parametrize("name, spec", [(n, s) for n in MODELS for s in (STRESS, ADAPTIVE)
                                        if n != "qwen" or s is STRESS],   # the suite's time
                         ids=lambda v: v if isinstance(v, str) else
                         ("stress" if v is STRESS else "adaptive"))
def test_greedy_alone_with_logprobs(name, spec):
    llm = make(name)
    n = 24 if name == "qwen" else 48       # the 0.5B model: copying runs within 24 (time)
    for label, prompt in [("echo", echo_prompt(llm, CODE)), ("raw echo", raw_echo(llm, POEM)),
                          ("free", free_prompt(llm, FREE[0]))]:
        ignore_eos = label == "raw echo"
        _, counted = on_off(name, [prompt], greedy(n, logprobs=2, ignore_eos=ignore_eos),
                            spec, f"{name} {label} ignore_eos={ignore_eos}")
        if label != "free":
            counted.assert_used()


@model
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_batch_of_16(name):
    llm = make(name)
    prompts = mixed_prompts(llm, 16)
    # rows of 5 lengths finishing at different steps; the 0.5B model at half of them (time)
    base, inc = (12, 2) if name == "qwen" else (24, 4)
    params = [greedy(base + inc * (i % 5), logprobs=2, ignore_eos=i % 2 == 0)
              for i in range(16)]
    _, counted = on_off(name, prompts, params, STRESS, f"{name} batch")
    counted.assert_used(rejected=True)
    if name == "smollm":
        _, counted = on_off(name, prompts, params, ADAPTIVE, f"{name} batch adaptive")
        counted.assert_used()


@model
@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_seeded_sampling(name):
    llm = make(name)
    prompts = mixed_prompts(llm, 4)
    params = [sampled(32, seed=100 + i, logprobs=2) for i in range(4)]
    _, counted = on_off(name, prompts, params, STRESS, f"{name} sampled batch")
    counted.assert_used(rejected=True)
    _, counted = on_off(name, prompts[:1], params[:1], STRESS, f"{name} sampled alone")
    counted.assert_used()


@model
def test_sampled_distribution_is_the_plain_one():
    """Seeds 0..N-1 at temperature 1 give every run's output the same bits with speculation
    as without; the empirical distribution of the sampled tokens over those runs is thus
    the plain one exactly (the speculative path draws from the same distributions with the
    same generator draws, one per emitted token), which a frequency test could only
    approximate. Drafts are verified and some rejected, so the rejection path is in it."""
    from ostinato import SamplingParams
    llm = make("smollm")
    prompt = echo_prompt(llm, POEM)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12) for s in range(64)]
    got, counted = on_off("smollm", [prompt] * 64, params, STRESS, "distribution")
    counted.assert_used(rejected=True)
    seconds = {tuple(o.outputs[0].token_ids[:2]) for o in got}
    assert len(seconds) > 1                      # really sampled, not one answer


@model
def test_prefix_caching_and_chunked_prefill():
    llm = make("smollm")
    prompts = mixed_prompts(llm, 6)
    params = greedy(40, logprobs=2)
    want = make("smollm", enable_prefix_caching=False).generate(prompts, params)
    fast = make("smollm", STRESS)
    hits = fast.engine.stats.prefix_cache_hits
    counted = Counted(fast)
    assert_same(fast.generate(prompts, params), want, "cache cold")
    assert_same(fast.generate(prompts, params), want, "cache warm")
    assert fast.engine.stats.prefix_cache_hits > hits
    counted.assert_used()
    chunked = make("smollm", STRESS, max_num_batched_tokens=32)
    n0 = chunked.engine.stats.tokens_per_step.count
    counted = Counted(chunked)
    assert_same(chunked.generate(prompts, params), want, "chunked")
    per_step = chunked.engine.stats.tokens_per_step.since(n0)
    assert max(per_step) <= 32 and per_step.count(32) >= 3
    counted.assert_used()


@model
def test_stop_string_inside_an_accepted_run():
    """The stop string is picked where the speculative run emitted a run of 3+ tokens in one
    step (a kept draft), ending at the run's 2nd token: the rest of that step is cut."""
    from ostinato import SamplingParams
    llm, fast = make("smollm"), make("smollm", STRESS)
    prompt = echo_prompt(llm, CODE)
    free = greedy(80, ignore_eos=True)
    full = llm.generate([prompt], free)[0].outputs[0]
    picked, pos = [], 0
    for d in fast.stream_deltas(prompt, free):
        if len(d.token_ids) >= 3 and pos > 4:
            upto = llm.detokenize(full.token_ids[: pos + 2], skip_special_tokens=True)
            stop = upto[-5:]
            if stop.strip() and full.text.find(stop) == len(upto) - 5:
                picked.append(stop)
        pos += len(d.token_ids)
    assert len(picked) >= 2, "no kept draft run to stop inside"
    for stop, incl in [(picked[0], False), (picked[-1], True)]:
        params = SamplingParams(temperature=0, max_tokens=80, stop=[stop], logprobs=2,
                                include_stop_str_in_output=incl, ignore_eos=True)
        got, counted = on_off("smollm", [prompt], params, STRESS, f"stop {stop!r}")
        c = got[0].outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert c.text.endswith(stop) == incl


@model
def test_max_tokens_min_tokens_penalties_and_n():
    from ostinato import SamplingParams
    llm = make("smollm")
    echo = echo_prompt(llm, POEM)
    for m in (1, 2, 3, 5, 9, 17):
        got, counted = on_off("smollm", [echo], greedy(m, ignore_eos=True), STRESS, f"max {m}")
        assert len(got[0].outputs[0].token_ids) == m
        if m >= 3:
            counted.assert_used()
    short = echo_prompt(llm, "hello")
    plain = llm.generate([short], greedy(40))[0].outputs[0]
    assert len(plain.token_ids) < 30               # it would stop early on its own
    got, _ = on_off("smollm", [short], greedy(40, min_tokens=30, logprobs=2), STRESS, "min")
    assert len(got[0].outputs[0].token_ids) >= 30
    _, counted = on_off("smollm", [echo], greedy(48, repetition_penalty=1.3, logprobs=2),
                        STRESS, "repetition penalty")
    _, counted = on_off("smollm", [echo, echo_prompt(llm, CODE)],
                        SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=7,
                                       max_tokens=40, logprobs=1), STRESS, "n=2")
    counted.assert_used()
    _, counted = on_off("smollm", [echo], SamplingParams(n=2, temperature=0, max_tokens=40),
                        STRESS, "n=2 greedy")
    counted.assert_used()


@model
@pytest.mark.parametrize("name", ["smollm", "qwen"])
def test_structured_output(name):
    import json
    from ostinato import SamplingParams
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "city", "age", "tags"]}
    obj = {"name": "Ada Lovelace", "city": "London", "age": 36,
           "tags": ["mathematics", "engines", "poetry", "notes"]}
    llm = make(name)
    prompt = echo_prompt(llm, json.dumps(obj))
    for logprobs in (None, 2):
        params = SamplingParams(temperature=0, max_tokens=80, logprobs=logprobs,
                                structured_outputs={"json": schema})
        got, counted = on_off(name, [prompt, prompt], params, STRESS, f"{name} json")
        counted.assert_used()
        json.loads(got[0].outputs[0].text)


@model
def test_cancellation_leaves_the_other_request_and_no_blocks():
    llm, fast = make("smollm"), make("smollm", STRESS)
    a, b = echo_prompt(llm, CODE), echo_prompt(llm, POEM)
    params = greedy(60, logprobs=2, ignore_eos=True)
    want = llm.generate([b], params)
    eng = fast.engine
    counted = Counted(fast)
    ra, rb = eng.add_request(a, params), eng.add_request(b, params)
    for _ in range(8):
        eng.step()
        eng.scheduler.check_integrity()
    assert any(s.draft_ids for s in eng.scheduler.running)   # mid-run, drafts pending
    eng.abort(ra)
    eng.scheduler.check_integrity()
    while eng.has_unfinished():
        eng.step()
        eng.scheduler.check_integrity()
    got = [fast._output(rb, None)]
    assert_same(got, want, "after an abort")
    counted.assert_used()
    assert eng.scheduler.kv.usage() == 0 and not eng.scheduler.running
    assert ra not in eng.seqs


# -- a draft model ----------------------------------------------------------------------------
def draft_spec(name: str, **kw) -> SpeculativeConfig:
    return SpeculativeConfig(method="draft", draft_model=str(model_file(MODELS[name])), **kw)


@model
def test_draft_model_greedy_and_sampled_equal_plain():
    """SmolLM2 guessing for itself: its guesses are the target's own greedy tokens, so
    most are kept (the verification is exercised on long runs); sampled requests reject
    many (each rejection rolls the shadow back, and its blocks out of the draft cache's
    prefix cache). Both give the plain bits, alone and batched, and its shadows are dropped
    with the requests that owned them."""
    spec = draft_spec("smollm", num_speculative_tokens=6, adaptive=False)
    fast = make("smollm", spec)
    prompts = mixed_prompts(fast, 6)
    _, counted = on_off("smollm", prompts, greedy(48, logprobs=1), spec, "draft greedy")
    counted.assert_used()
    drafts, drafted, accepted = counted.delta
    assert accepted >= 0.9 * drafted, f"a model guessing for itself kept only {counted.delta}"
    _, counted = on_off("smollm", prompts[:4], [sampled(32, seed=s) for s in range(4)], spec,
                        "draft sampled")
    counted.assert_used(rejected=True)
    draft = fast.engine.speculator.model_proposer
    assert not draft.shadows, "shadows outlived their requests"
    draft.kv.check_integrity()
    assert draft.kv.usage() == 0
    # the draft cache keeps the prompts' blocks (never a guess's): a second run hits them
    hits = draft.kv.prefix_hits
    on_off("smollm", prompts[:2], greedy(24), spec, "draft cached")
    assert draft.kv.prefix_hits > hits
    draft.kv.check_integrity()


@model
def test_draft_model_with_another_vocabulary_is_refused():
    from ostinato import LLM
    with pytest.raises(ValueError, match="vocabulary differs"):
        LLM(model_file(MODELS["smollm"]), max_model_len=512, kv_cache_gb=0.05,
            speculative=draft_spec("gemma"))
