"""The static plan (derived from the decoder, one C++ call per step) computes exactly what
the eager Python decoder does:
the same hidden states, bit for bit, on a batch mixing prefill chunks and decode steps, for
both model families (Gemma 3 brings q/k norms, post norms, GeGLU and sliding windows)."""
from __future__ import annotations

import pytest
import torch

from ostinato import LLM, SamplingParams
from plancheck import plan_and_eager

pytestmark = pytest.mark.model


@pytest.fixture(params=["smollm_path", "gemma_path"])
def llm(request):
    return LLM(request.getfixturevalue(request.param), max_model_len=1024, kv_cache_gb=0.05,
               max_num_batched_tokens=96)


def test_the_plan_is_used_and_equals_the_python_model_bit_for_bit(llm):
    prompts = [llm.tokenize("The quick brown fox " * n) for n in (1, 9, 30)]
    with plan_and_eager(llm) as seen:
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert len(seen) >= 6 and any(n > 1 for n, _ in seen) and any(n == 3 for n, _ in seen)
    assert all(same for _, same in seen), seen


def test_after_start_up_a_step_allocates_nothing(llm):
    """The static plan: the workspace and every thread's kernel scratch are sized at start-up
    for the largest step (96 tokens, contexts up to 1024), so a mixed workload (prefill
    chunks, decode batches of several sizes, prompt logprobs, n > 1, a prefix-cache hit)
    grows no scratch, and inside the plan no tensor storage is allocated at all (the
    profiler sees every allocation of torch's CPU allocator on this thread: a kernel that
    made its output, or a torch op that made a temporary, would show)."""
    from ostinato.kernels import ops
    runner = llm.engine.runner
    plan_forward = runner.forward
    allocations = []

    def profiled(input_ids, positions, meta, caches):
        args = plan_forward.inputs(input_ids, positions, meta)      # embedding, rotary tables
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            out = plan_forward.plan.forward(*args)
        allocations.append([e.name for e in prof.events() if e.cpu_memory_usage > 0])
        return out
    runner.forward = profiled
    before = ops().scratch_growths()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    prompts = [llm.tokenize(text[: 9 * n]) for n in (1, 5, 30, 90)]
    llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    llm.generate(prompts[3], SamplingParams(max_tokens=3, n=3, temperature=0.8, seed=1,
                                            prompt_logprobs=1))
    llm.generate([llm.tokenize(text)], SamplingParams(max_tokens=2))        # 200+ tokens
    assert len(allocations) > 20
    assert ops().scratch_growths() == before, "a step grew the kernels' scratch"
    assert allocations == [[]] * len(allocations), allocations


def test_a_servers_warm_up_makes_the_kv_cache_resident(smollm_path):
    """The backends allocate the KV pool untouched; the warm-up a server runs before its first
    step (Engine.warm_up, on the engine thread) writes every page of it, so all of it is
    resident from the start. Before, a fresh server touched a new block a request until the
    pool was used up, and its RSS climbed to the pool's size under load (the 30 s soak failed
    its RSS check when run alone). Checked by writing, not by RSS: freed heap pages the
    process already holds may back a new tensor, so RSS need not move."""
    llm = LLM(smollm_path, max_model_len=1024, kv_cache_gb=0.05)
    caches = [t for layer in llm.engine.runner.kv_caches for t in layer]
    for t in caches:
        t.fill_(1.0)                      # stands for pages never touched
    llm.engine.warm_up()
    assert all(not t.any() for t in caches)
    out = llm.generate([llm.tokenize("The quick brown fox")],
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
