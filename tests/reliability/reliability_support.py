"""Helpers of the reliability tests: the server's limits for these tests, reading its
outcome counters, waiting until it is idle. Starting and stopping it is in tests/serverproc.py."""
from __future__ import annotations

import time

from serverproc import Server, free_port, read_metrics, start_server, stop_server  # noqa: F401

FAULT_MARKER = "xq-inject-fault-7"       # prompts containing it fail in output processing
MAX_MODEL_LEN = 256
MAX_TOKENS = 12                          # --max-tokens-limit: fuzzed requests stay short
MAX_N = 4
MAX_STOPS = 4
MAX_STOP_CHARS = 32
MAX_BODY_MB = 0.25
MAX_PROMPT_TOKENS = 192
MAX_LOGPROBS = 5
MAX_PROMPTS = 3                          # prompts in one /v1/completions request


def outcomes(m: dict[str, float]) -> dict[str, float]:
    return {o: m.get(f"ostinato_request_outcomes_total[{o}]", 0.0)
            for o in ("completed", "error", "aborted")}


def wait_idle(server: Server, timeout: float = 15.0) -> dict[str, float]:
    """Metrics once nothing runs or waits, every accepted request has its outcome and the
    KV cache is empty; the last metrics seen if that never happens."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        settled = sum(outcomes(m).values()) == m.get("ostinato_requests_accepted_total", 0)
        idle = (m["ostinato:num_requests_running"] == 0 and
                m["ostinato:num_requests_waiting"] == 0 and
                m["ostinato:kv_cache_usage_perc"] == 0)
        if (settled and idle) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
