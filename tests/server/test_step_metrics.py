"""The engine's step-time distribution in /metrics and the startup lines (the scheduler's, the
frozen heap), on the session's real server (the default target: auto)."""
from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ostinato.engine.step_time import AUTO_FLOOR_S, AUTO_RATIO


def step_samples(base: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        if fam.name in ("ostinato:step_seconds", "ostinato:step_tokens"):
            for s in fam.samples:
                out[s.name + (f"[{s.labels['le']}]" if "le" in s.labels else "")] = s.value
    return out


def test_step_seconds_and_tokens_histograms(server, client):
    before = step_samples(server.base)
    out = client.completions.create(model=server.model, prompt="Count: one, two,", max_tokens=5,
                                    extra_body={"ignore_eos": True})
    after = step_samples(server.base)
    steps = after["ostinato:step_seconds_count"] - before.get("ostinato:step_seconds_count", 0)
    assert steps >= 5                       # a prefill step, then a step per further token
    assert after["ostinato:step_tokens_count"] - before.get("ostinato:step_tokens_count", 0) \
        == steps
    tokens = after["ostinato:step_tokens_sum"] - before.get("ostinato:step_tokens_sum", 0)
    assert tokens >= out.usage.prompt_tokens + 4
    seconds = after["ostinato:step_seconds_sum"] - before.get("ostinato:step_seconds_sum", 0)
    assert 0 < seconds < 60
    assert {"ostinato:step_seconds_bucket[0.001]", "ostinato:step_seconds_bucket[5.0]",
            "ostinato:step_tokens_bucket[1.0]"} <= after.keys()


def test_the_startup_heap_is_frozen(server):
    """The objects alive once the model is loaded sit in the collector's permanent generation
    (a full collection no longer walks them while serving): the log says how many."""
    with open(server.log_path, errors="replace") as f:
        m = re.search(r"gc: (\d+) startup objects frozen; a full collection took [\d.]+ ms "
                      r"with them, [\d.]+ ms now", f.read())
    assert m and int(m.group(1)) > 50_000


def test_startup_line_names_the_target(server):
    with open(server.log_path, errors="replace") as f:
        log = f.read()
    assert f"scheduler: step-time target auto (at least {AUTO_RATIO}x the decode step, " \
           f"{AUTO_FLOOR_S * 1e3:.0f} ms and the decode step of the batch the queue will " \
           "make, rising while prefill falls behind: uniform steps that keep up with " \
           "demand), at most 512 tokens a step" in log
