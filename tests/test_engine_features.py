"""Continuous batching, prefix caching, chunked prefill and preemption on the real models:
each feature must leave greedy outputs exactly as they are without it."""
from __future__ import annotations

import pytest

from ostinato import LLM, SamplingParams
from ostinato.engine.kv_cache import NULL_BLOCK

pytestmark = pytest.mark.model
MAX_LEN = 512
SYSTEM = ("You are a careful assistant for a small bakery. You answer questions about bread, "
          "cakes, opening hours and prices in one short sentence, politely, and never invent "
          "facts you were not given. The bakery opens at seven and closes at six. ")
WORDS = ["river", "stone", "apple", "cloud", "green", "seven", "music", "paper", "light",
         "table", "winter", "ocean", "tiger", "glass", "honey", "silver", "candle", "forest",
         "garden", "window", "bridge", "rabbit", "yellow", "mountain", "pencil", "summer",
         "castle", "dragon", "orange", "planet", "rocket", "violin"]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def make_llm(smollm_path):
    """LLM(smollm, **knobs), built once per distinct knobs in this module."""
    built: dict[tuple, LLM] = {}

    def make(**knobs) -> LLM:
        knobs = {"max_model_len": MAX_LEN, "kv_cache_gb": 0.05, **knobs}
        key = tuple(sorted(knobs.items()))
        if key not in built:
            built[key] = LLM(smollm_path, **knobs)
        return built[key]
    return make


def token_ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def test_prefix_caching_gives_the_same_tokens(make_llm):
    prompts = [SYSTEM + f"Question {i}: do you sell {w} bread?" for i, w in enumerate(WORDS[:8])]
    on, off = make_llm(enable_prefix_caching=True), make_llm(enable_prefix_caching=False)
    hits0 = on.engine.stats.prefix_cache_hits
    first = token_ids(on.generate(prompts, greedy(8)))
    second = token_ids(on.generate(prompts, greedy(8)))      # every prompt's prefix is cached
    want = token_ids(off.generate(prompts, greedy(8)))
    st = on.engine.stats
    assert st.prefix_cache_hits - hits0 >= 8 * ((len(on.tokenize(SYSTEM)) - 1) // 16 * 16)
    assert 0 < st.prefix_cache_hit_rate <= 1
    assert off.engine.stats.prefix_cache_hits == 0
    assert first == want
    assert second == want


def test_chunked_prefill_gives_the_same_tokens(make_llm):
    prompts = [SYSTEM * 2 + f"Tell me about {w}." for w in WORDS[:3]]
    small = make_llm(max_num_batched_tokens=32, enable_prefix_caching=False)
    big = make_llm(max_num_batched_tokens=2048, enable_prefix_caching=False)
    n0 = small.engine.stats.tokens_per_step.count
    got = token_ids(small.generate(prompts, greedy(8)))
    want = token_ids(big.generate(prompts, greedy(8)))
    per_step = small.engine.stats.tokens_per_step.since(n0)
    assert max(per_step) <= 32 and per_step.count(32) >= 3   # the prompts came in chunks
    assert big.engine.stats.tokens_per_step.peak > 32 * 3     # one step took every prompt
    assert got == want


def blocks_gb(llm: LLM, n_blocks: float, block_size: int = 16) -> float:
    c = llm.config
    per_layer = llm.engine.runner.model.ops.kv_cache_bytes(block_size, c.n_kv_heads, c.head_dim)
    return n_blocks * c.n_layers * per_layer / (1 << 30)


def test_preemption_gives_the_same_tokens_and_prompt_logprobs(make_llm):
    big = make_llm(max_model_len=128)
    tiny = make_llm(max_model_len=128, kv_cache_gb=blocks_gb(big, 16.5))   # 15 usable blocks
    assert tiny.engine.scheduler.kv.pools[0].num_blocks == 16
    prompts = [f"Write a short poem about the {w} and the sea." for w in WORDS[:8]]
    params = [greedy(24, prompt_logprobs=1 if i % 2 else None) for i in range(8)]
    got = tiny.generate(prompts, params)                     # 8 x ~37 tokens: 3 blocks each
    want = big.generate(prompts, params)
    assert tiny.engine.stats.preemptions > 0
    assert token_ids(got) == token_ids(want)
    for g, w in zip(got[1::2], want[1::2]):                  # recomputed, never appended twice
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids)
        assert logprob_keys(g) == logprob_keys(w)


def logprob_keys(out) -> list[set[int] | None]:
    return [e and set(e) for e in out.prompt_logprobs]


def test_batch_of_32_gives_what_each_gives_alone(make_llm):
    llm = make_llm(enable_prefix_caching=False)
    prompts = [f"A short sentence with the word {w}:" for w in WORDS]
    n0 = llm.engine.stats.batch_sizes.count
    together = token_ids(llm.generate(prompts, greedy(6)))
    assert max(llm.engine.stats.batch_sizes.since(n0)) >= 16
    alone = [token_ids(llm.generate(p, greedy(6)))[0] for p in prompts]
    mismatched = [p for p, t, a in zip(prompts, together, alone) if t != a]
    assert not mismatched, f"{len(mismatched)} of 32 differ, e.g. {mismatched[:3]}"


def test_gemma_sliding_window_frees_blocks_and_chunked_prefill_agrees(gemma_path):
    """A 600-token prompt: past the 512 window, the sliding group's old blocks become null
    blocks (already during the last prefill chunk, at 576) while the full group keeps all."""
    prompt = list(range(1000, 1600))
    params = greedy(4)
    one_shot = LLM(gemma_path, max_model_len=1024, kv_cache_gb=0.05, max_num_batched_tokens=1024)
    chunked = LLM(gemma_path, max_model_len=1024, kv_cache_gb=0.05, max_num_batched_tokens=96)
    want = one_shot.generate([prompt], params)[0].outputs[0]
    engine, kv = chunked.engine, chunked.engine.scheduler.kv
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
        if f"{rid}/0" in kv.seqs:
            full, sliding = (list(t) for t in kv.seqs[f"{rid}/0"].tables)
    got = engine.pop_finished(rid)[0]
    assert got.output_ids == want.token_ids
    # logprobs see a wrongly masked key even where the argmax does not
    assert got.cumulative_logprob == want.cumulative_logprob     # batch-invariant: bit for bit
    # the last step's query is at 602 and sees 91..602: blocks 0..4 are out of the window
    assert NULL_BLOCK not in full and sliding[:5] == [NULL_BLOCK] * 5
    assert NULL_BLOCK not in sliding[5:] and kv.usage() == 0


def all_logprobs(outs) -> list:
    """Every logprob float a request saw: prompt positions and generated positions."""
    res = []
    for o in outs:
        if o.prompt_logprobs is not None:
            res.append([e and {t: lp.logprob for t, lp in e.items()} for e in o.prompt_logprobs])
        for c in o.outputs:
            res.append([{t: lp.logprob for t, lp in e.items()} for e in c.logprobs])
    return res


@pytest.mark.parametrize("kv", ["float16", "int8-values"])
def test_logits_bit_identical_alone_batched_chunked_cached(make_llm, kv):
    """Not just the same argmax: the same float bits, whoever shares the step (with
    --kv-cache-dtype int8-values too: a value's codes and scales depend on it alone)."""
    prompts = [SYSTEM + f"Describe the {w} in five words." for w in WORDS[:6]]
    params = greedy(5, logprobs=5, prompt_logprobs=3)
    ref = make_llm(enable_prefix_caching=False, kv_cache_dtype=kv)
    chunked = make_llm(max_num_batched_tokens=24, enable_prefix_caching=False, kv_cache_dtype=kv)
    cached = make_llm(enable_prefix_caching=True, kv_cache_dtype=kv)
    alone = [all_logprobs(ref.generate(p, params)) for p in prompts]
    alone = [x for a in alone for x in a]
    assert all_logprobs(ref.generate(prompts, params)) == alone
    assert all_logprobs(chunked.generate(prompts, params)) == alone
    cached.generate(prompts, greedy(1))                       # warm the prefix cache
    hits = cached.engine.stats.prefix_cache_hits
    # prompt_logprobs bypass the cache, so compare generated logprobs from a cached prefix
    got = cached.generate(prompts, greedy(5, logprobs=5))
    assert cached.engine.stats.prefix_cache_hits > hits
    assert all_logprobs(got) == alone[1::2]                   # alone: [prompt, generated] pairs


@pytest.mark.parametrize("model", ["smollm_path", "gemma_path"])
def test_greedy_rows_in_one_call_give_what_each_alone_gives(request, model):
    """Plain greedy rows take one batched argmax + log-sum-exp call; rows with logits
    processing, logprobs, prompt logprobs or sampling take the per-sequence way. Both must
    give the same tokens and the same log-probabilities, bit for bit, in a mixed batch."""
    llm = LLM(request.getfixturevalue(model), max_model_len=MAX_LEN, kv_cache_gb=0.05)
    prompts = [f"Tell me about the {w}." for w in WORDS[:7]]
    params = [greedy(10), greedy(10), greedy(10, logprobs=2), greedy(10, repetition_penalty=1.3),
              greedy(10, prompt_logprobs=1), greedy(10, min_tokens=4),
              SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True)]
    runner = llm.engine.runner
    calls = []
    quick = runner._quick_greedy

    def counted(plan, spans, logits):
        got = quick(plan, spans, logits)
        calls.append(sum(v is not None for v in got.values()))
        return got
    runner._quick_greedy = counted
    fast = llm.generate(prompts, params)
    runner.quick_greedy = False
    slow = llm.generate(prompts, params)
    assert sum(calls) >= 2 * 9 and token_ids(fast) == token_ids(slow)   # 2 plain rows, 9+ steps
    for a, b in zip(fast, slow):
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
        assert a.prompt_logprobs == b.prompt_logprobs


def test_logits_kept_in_one_buffer_across_steps_give_what_fresh_ones_give(make_llm):
    """The batched LM head writes into a buffer the runner keeps (no 67 MB mapped anew each
    step on Gemma 3); rows that go on to logits processing, sampling, logprobs or their own
    prompt-logprob LM head in the same step must see what a fresh tensor gives, to the bit."""
    llm = make_llm(max_num_batched_tokens=64)
    runner = llm.engine.runner
    prompts = [f"Tell me about the {w}." for w in WORDS[:8]]
    params = [greedy(12), greedy(12, logprobs=3), greedy(12, repetition_penalty=1.3),
              greedy(12, prompt_logprobs=2), greedy(12, logit_bias={11: 5.0}),
              SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True,
                             logprobs=1),
              SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=12,
                             ignore_eos=True), greedy(12, min_tokens=6)]
    ptrs = set()
    kept = runner._logits_out

    def watched(n):
        out = kept(n)
        ptrs.add(out.untyped_storage().data_ptr())
        return out
    runner._logits_out = watched
    try:
        with_buffer = llm.generate(prompts, params)
        runner._logits_out = lambda n: None                   # a fresh tensor each step
        fresh = llm.generate(prompts, params)
    finally:
        runner._logits_out = kept
    assert len(ptrs) == 1                                     # one buffer, every step
    assert token_ids(with_buffer) == token_ids(fresh)
    for a, b in zip(with_buffer, fresh):
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob
        assert a.prompt_logprobs == b.prompt_logprobs
