"""The reliability tests' session server: small limits (so fuzzed requests stay cheap) and
the fault-injection test hook on."""
from __future__ import annotations

import httpx
import pytest
from reliability_support import (
    FAULT_MARKER,
    MAX_BODY_MB,
    MAX_LOGPROBS,
    MAX_MODEL_LEN,
    MAX_N,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOKENS,
    start_server,
    stop_server,
)


@pytest.fixture(scope="session")
def rserver(smollm_path):
    s = start_server(
        smollm_path, "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gb", "0.1",
        "--max-tokens-limit", str(MAX_TOKENS), "--max-n", str(MAX_N),
        "--max-stop-strings", str(MAX_STOPS), "--max-stop-string-chars", str(MAX_STOP_CHARS),
        "--max-body-mb", str(MAX_BODY_MB), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
        "--max-concurrent-streams", "96", "--max-logprobs", str(MAX_LOGPROBS),
        "--max-prompts", str(MAX_PROMPTS),
        env={"OSTINATO_FAULT_INJECT": FAULT_MARKER})
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture
def http(rserver):
    with httpx.Client(base_url=rserver.base, timeout=60) as c:
        yield c
