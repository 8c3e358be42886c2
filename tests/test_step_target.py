"""The latency target on the real model: a long prompt arriving while 8 streams decode is
prefilled in chunks whose steps stay, on average, within the target, and every token comes
out exactly as with the target off (the kernels are chunk- and batch-invariant)."""
from __future__ import annotations

import statistics

import pytest

from ostinato import LLM, SamplingParams
from ostinato.engine.step_time import LatencyTarget

pytestmark = pytest.mark.model

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
