"""The compiled Plan (one C++ call per step) computes exactly what the Python model does:
the same hidden states, bit for bit, on a batch mixing prefill chunks and decode steps, for
both model families (Gemma 3 brings q/k norms, post norms, GeGLU and sliding windows)."""
from __future__ import annotations

import pytest
import torch

from ostinato import LLM, SamplingParams

pytestmark = pytest.mark.model


@pytest.fixture(params=["smollm_path", "gemma_path"])
def llm(request):
    return LLM(request.getfixturevalue(request.param), max_model_len=1024, kv_cache_gb=0.05,
               max_num_batched_tokens=96)


def test_the_plan_is_used_and_equals_the_python_model_bit_for_bit(llm):
    runner = llm.engine.runner
    assert runner.forward is not runner.model.forward, "the plan was not compiled"
    seen = []
    plan_forward = runner.forward

    def both(input_ids, positions, meta, caches):
        # the eager model writes the same K/V into the caches first; the plan then rewrites
        # them with the same values and must give the same hidden states
        eager = runner.model.forward(input_ids, positions, meta, caches)
        planned = plan_forward(input_ids, positions, meta, caches)
        seen.append((len(input_ids), torch.equal(eager, planned)))
        return planned
    runner.forward = both
    prompts = [llm.tokenize("The quick brown fox " * n) for n in (1, 9, 30)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert len(seen) >= 6 and any(n > 1 for n, _ in seen) and any(n == 3 for n, _ in seen)
    assert all(same for _, same in seen), seen
