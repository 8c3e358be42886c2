"""Run every step of an LLM through both the static plan and the eager decoder (a plain
test-support module, imported by test modules)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


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
