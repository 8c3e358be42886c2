"""Run every step of an LLM through both the static plan and the eager decoder, and read a
prompt's logits at every position (a plain test-support module, imported by test modules)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ostinato import LLM, SamplingParams


@contextmanager
def plan_and_eager(llm):
    """Within the block each step runs the eager decoder first (it writes the same K/V into
    the caches), then the plan, which must give the same hidden states; yields the list of
    (tokens in the step, whether they were equal bit for bit)."""
    runner = llm.engine.runner
    plan_forward = runner.forward
    assert plan_forward is not runner.model.forward, "no plan was derived"
    seen: list[tuple[int, bool]] = []

    def both(input_ids, positions, meta, caches):
        eager = runner.model.forward(input_ids, positions, meta, caches)
        planned = plan_forward(input_ids, positions, meta, caches)
        seen.append((len(input_ids), torch.equal(eager, planned)))
        return planned
    runner.forward = both
    try:
        yield seen
    finally:
        runner.forward = plan_forward


def ostinato_llm(path, kv_cache_dtype="float32", **kw) -> LLM:
    """An LLM for the exactness bars: a float32 KV cache (the default float16 cache rounds
    keys and values: ~5e-3 on these logits), one prompt per step."""
    return LLM(path, max_model_len=256, kv_cache_gb=0.01, enable_prefix_caching=False,
               kv_cache_dtype=kv_cache_dtype, **kw)


def logits_of(llm: LLM, ids: list[int]) -> np.ndarray:
    """(T, vocab) logits at every position of `ids` (one prefill step; the hidden states the
    model computes, through the LM head)."""
    runner, seen = llm.engine.runner, []
    forward = runner.forward

    def spy(*args):
        hidden = forward(*args)
        seen.append(hidden.clone())
        return hidden
    runner.forward = spy
    try:
        llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        runner.forward = forward
    assert seen[0].shape[0] == len(ids), "the prompt did not run as one step"
    return runner.model.compute_logits(seen[0]).numpy()

