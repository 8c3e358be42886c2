"""The latency target. On the real model: a long prompt arriving while 8 streams decode is
prefilled in chunks whose steps stay, on average, within the target, and every token comes
out exactly as with the target off (the kernels are chunk- and batch-invariant). In pure
Python (milliseconds): auto's level (AutoDemand) follows demand, in the real scheduler and in
the simulator (ostinato/bench/schedsim.py) under Poisson arrivals of mixed prompts."""
from __future__ import annotations

import statistics

import pytest
from test_scheduler import make_sched, make_seq, step, target_sched

from ostinato import LLM, SamplingParams
from ostinato.bench.schedsim import Workload, simulate
from ostinato.engine.step_time import (
    AUTO_DOWN,
    AUTO_FLOOR_S,
    AUTO_MAX_RATIO,
    AUTO_RATIO,
    AUTO_UP,
    AutoDemand,
    LatencyTarget,
)

DECODE = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def workload(llm: LLM) -> tuple[dict[str, list[int]], list[tuple[int, float, bool]]]:
    """8 streams decode; after 3 steps a 400-token prompt arrives. Returns each request's
    tokens and (tokens, seconds, the long prompt in prefill beside decoding streams) per
    step."""
    eng = llm.engine
    short = [llm.tokenize(f"Question {i}: name a colour and a fruit.") for i in range(8)]
    long_ids = llm.tokenize(" ".join(f"river{i % 97} stone{i % 13}" for i in range(160)))[:400]
    rids = [eng.add_request(p, DECODE, f"s{i}") for i, p in enumerate(short)]
    steps, out = [], {}
    for k in range(200):
        if k == 3:
            rids.append(eng.add_request(long_ids, LONG, "long"))
        if not eng.has_unfinished():
            break
        long_seq = eng.seqs.get("long", [None])[0]
        prefilling = long_seq is not None and long_seq.in_prefill and any(
            not s.in_prefill for s in eng.scheduler.running)
        for d in eng.step():
            out.setdefault(d.seq.request_id, []).extend(d.token_ids)
        st = eng.stats
        steps.append((st.tokens_per_step.recent[-1], st.step_seconds.recent[-1], prefilling))
    for rid in rids:
        eng.pop_finished(rid)
    return out, steps


@pytest.mark.model
def test_target_is_honoured_on_average_and_outputs_do_not_change(smollm_path):
    llm = LLM(smollm_path, threads=1, target_itl_ms="off", enable_prefix_caching=False,
              max_num_batched_tokens=512)
    off, off_steps = workload(llm)
    assert [t for t, _, p in off_steps if p] == [8 + 400]       # one step: all of the prompt
    decode_s = statistics.median(s for t, s, p in off_steps if t == 8)
    target = 2.5 * decode_s
    llm.engine.scheduler.target = LatencyTarget(seconds=target, auto=False)
    on, on_steps = workload(llm)
    assert on == off and set(on) == {*(f"s{i}" for i in range(8)), "long"}
    mixed = [(t, s) for t, s, p in on_steps if p]             # decode rows + a chunk
    assert len(mixed) >= 4 and all(8 < t < 8 + 400 for t, _ in mixed), on_steps
    mean = statistics.mean(s for _, s in mixed)
    assert mean <= 1.5 * target, (mean, target, decode_s, mixed)


# -- auto follows demand (pure Python) ------------------------------------------------------
def test_auto_level_rises_while_behind_falls_when_dry_and_holds_otherwise():
    d = AutoDemand()
    low, high = 0.050, 0.150
    assert d.update(True, False, low, high) == low            # no demand: the rule
    for k in range(1, 11):                                     # behind: 0.4% a step
        assert d.update(True, True, low, high) == pytest.approx(low * (1 + AUTO_UP) ** k)
    held = d.level
    assert d.update(True, False, low, high) == held            # keeping up: it holds
    assert d.update(False, True, low, high) == pytest.approx(held * (1 - AUTO_DOWN))  # dry
    for _ in range(1000):
        d.update(True, True, low, high)
    assert d.level == high                                     # never past the highest
    for _ in range(1000):
        d.update(False, False, low, high)
    assert d.level == low                                      # nor below the rule
    assert d.update(True, False, 0.080, high) == 0.080         # more decode rows: a higher rule


def test_auto_without_demand_stays_at_the_rule():
    """8 decoders and a short prompt now and then: the steps with prefill take the rule
    (max(the floor, 1.25 x the decode rows)), as before issue 17."""
    sched = target_sched("auto", budget=512, blocks=512)
    decoders = [make_seq(f"d{i}", range(100 * i, 100 * i + 6)) for i in range(8)]
    for s in decoders:
        sched.add(s)
    step(sched)
    for k in range(40):
        if k % 10 == 0:
            sched.add(make_seq(f"p{k}", range(5000 + 100 * k, 5000 + 100 * k + 60)))
        step(sched)
        rule = max(AUTO_FLOOR_S, AUTO_RATIO * sched._step.decode_seconds)
        assert sched._step.target_seconds == pytest.approx(rule)     # no level on top


def test_auto_rises_uniformly_under_sustained_demand_then_falls_back():
    """8 decoders, 100 prompts of 1,000 tokens queued (100 s of prefill, more than the rule
    clears in a minute): the level climbs by at most 0.4% a step (consecutive steps alike) to
    3x the rule; when the prefill runs dry, it falls back to the rule."""
    sched = target_sched("auto", budget=512, blocks=20000)
    for i in range(8):
        sched.add(make_seq(f"d{i}", range(100 * i, 100 * i + 6)))
    step(sched)
    for i in range(100):
        sched.add(make_seq(f"p{i}", range(10 ** 5 * (i + 1), 10 ** 5 * (i + 1) + 1000)))
    targets, rules = [], []
    for _ in range(400):
        step(sched)
        targets.append(sched._step.target_seconds)
        rules.append(sched._step.rule_seconds)     # the floor, or the seated prompts' step
        for s in list(sched.running):         # a prompt leaves with its first token: the
            if s.seq_id[0] == "p" and s.output_ids:      # decode rows stay the same 8
                sched.finish(s, "length")
    assert min(rules) >= AUTO_FLOOR_S and max(rules) < 1.2 * min(rules)   # a steady rule
    assert targets[0] == pytest.approx(rules[0])
    assert all(b <= a * (1 + AUTO_UP) + 1e-12 for a, b in zip(targets, targets[1:]))
    assert targets[-1] == pytest.approx(AUTO_MAX_RATIO * rules[-1], rel=1e-4)
    for s in list(sched.waiting) + [s for s in sched.running if s.in_prefill]:
        sched.finish(s, "abort")                 # the demand goes away: only decoders left
    for _ in range(100):
        step(sched)
    assert sched.demand.level == pytest.approx(AUTO_FLOOR_S)


def test_off_and_fixed_targets_ignore_demand():
    sched = target_sched(30)
    for i in range(8):
        sched.add(make_seq(f"d{i}", range(100 * i, 100 * i + 6)))
    step(sched)
    for i in range(40):
        sched.add(make_seq(f"p{i}", range(10 ** 5 * (i + 1), 10 ** 5 * (i + 1) + 1000)))
    for _ in range(50):
        step(sched)
        assert sched._step.target_seconds == 0.030
    assert sched.demand.level == 0
    assert make_sched().target is None


def test_simulated_overload_keeps_tokens_even_at_near_off_throughput():
    """16 streams, Poisson arrivals at ~1.8x capacity of prompts of 64-2,048 tokens: auto's
    steps are uniform (ITL p99/p50 <= 1.3) and its throughput near off's (whose ITL p99 is a
    whole-budget step) and above the old rule's."""
    work = Workload(rate=1.0, requests=200)
    auto, off, old = (simulate(p, 16, work, steady_from=0.5) for p in ("auto", "off",
                                                                      "old-auto"))
    assert auto.itl_ratio <= 1.3 and auto.steady_ratio <= 1.3, auto
    assert auto.tok_s >= 0.95 * off.tok_s and auto.tok_s >= 1.05 * old.tok_s, (auto, off, old)
    assert off.itl_ratio > 10


def test_simulated_light_load_is_the_old_rule():
    """At ~70% of capacity, well within what the rule keeps up with, auto is the rule."""
    work = Workload(rate=0.4, requests=80)
    auto, old = simulate("auto", 16, work), simulate("old-auto", 16, work)
    for a, b in ((auto.tok_s, old.tok_s), (auto.itl_p50, old.itl_p50),
                 (auto.itl_p99, old.itl_p99), (auto.ttft_p99, old.ttft_p99)):
        assert a == pytest.approx(b, rel=0.02), (auto, old)


def test_simulated_clients_keep_at_most_their_number_in_flight(monkeypatch):
    """simulate(clients=c): at most c requests in the server (waiting or running) at once,
    the rest wait client-side; without it, every arrival joins the server's queue."""
    from ostinato.bench import schedsim
    peaks = []

    class Counting(schedsim.Scheduler):
        def add(self, seq):
            super().add(seq)
            peaks[-1] = max(peaks[-1], len(self.waiting) + len(self.running))

    monkeypatch.setattr(schedsim, "Scheduler", Counting)
    work = Workload(rate=5.0, requests=60)              # far over capacity: a queue builds
    for clients in (4, None):
        peaks.append(0)
        done = simulate("auto", 16, work, clients=clients)
        assert len(done.gaps) == 60 * (work.output - 1)  # every request served in full
    assert peaks[0] == 4 and peaks[1] > 16


def test_simulator_takes_a_step_cost_from_the_command_line(capsys):
    from ostinato.bench import schedsim
    schedsim.main(["--cost", "5,0.7,1.5,0.7", "--rates", "0.5", "--policies", "auto",
                   "--streams", "4", "--requests", "12"])
    out = capsys.readouterr().out
    cost = schedsim.SimCost(0.005, 0.0007, 0.0015, 0.0007)
    row = simulate("auto", 4, Workload(0.5, 12), cost).row()
    assert row in out and row != simulate("auto", 4, Workload(0.5, 12)).row()  # not the default
    assert f"4 streams {schedsim.capacity(4, Workload(1.0), cost):.3f} req/s" in out
    for bad in ("5,0.7,1.5", "5,x,1,1", "5,-1,1,1", "5,nan,1,1"):
        with pytest.raises(SystemExit):
            schedsim.main(["--cost", bad])


def test_simulated_step_jitter_sets_a_floor_no_target_removes(capsys):
    """--noise: each step's time times a log-normal factor (a shared machine). A fixed
    target's steps, even to 1.02 without it, spread with it; the same seed gives the same
    run, and the command line passes the sigma through."""
    from ostinato.bench import schedsim
    work = Workload(rate=1.0, requests=120)
    quiet, noisy = (simulate("60", 16, work, noise=s) for s in (0.0, 0.2))
    assert quiet.itl_ratio < 1.1 < 1.3 < noisy.itl_ratio, (quiet, noisy)
    assert simulate("60", 16, work, noise=0.2).gaps == noisy.gaps
    assert simulate("60", 16, Workload(1.0, 120, seed=1), noise=0.2).gaps != noisy.gaps
    schedsim.main(["--noise", "0.2", "--rates", "1", "--policies", "60", "--streams", "16",
                   "--requests", "120"])
    assert noisy.row() in capsys.readouterr().out
    for bad in ("-0.1", "x", "nan", "3"):
        with pytest.raises(SystemExit):
            schedsim.main(["--noise", bad])


def test_the_engine_counts_pairs_by_the_models_windows(gemma_path, smollm_llm):
    """Gemma 3's 18 layers: every sixth sees the whole context, the rest 512 keys; the
    engine's step-time model counts pairs so. SmolLM2 has no window: the count is the
    whole-context one."""
    from ostinato.engine.step_time import WHOLE_CONTEXT, AttentionSpan
    gemma = LLM(gemma_path, max_model_len=1024)
    span = gemma.engine.scheduler.step_time.span
    assert span == AttentionSpan(((None, 3), (512, 15)))
    assert gemma.config.layer_windows()[5::6] == [None] * 3
    assert span.pairs(2000, 100) < 0.4 * WHOLE_CONTEXT.pairs(2000, 100)
    assert smollm_llm.engine.scheduler.step_time.span == WHOLE_CONTEXT
