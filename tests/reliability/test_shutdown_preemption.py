"""A server with a KV cache too small for its load (preemption must not change a token),
without the fault hook (the marker must do nothing), and finally SIGTERM: new requests
refused, in-flight ones finished, then the process exits."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from reliability_support import FAULT_MARKER, start_server, stop_server, wait_idle

pytestmark = pytest.mark.model
SHUTDOWN_TIMEOUT = 30
# 16.5 blocks of 16 tokens for SmolLM2-135M (30 layers, 3 KV heads of 64, float16 K and V):
# 15 usable after the null block, while 6 requests of 32 + 24 tokens need 4 each
TINY_KV_GB = 16.5 * 2 * 30 * 16 * 3 * 64 * 2 / (1 << 30)
WORDS = ["sun", "moon", "sea", "sky", "tree", "cat", "dog", "bird"]
PROMPTS = [f"Write a short poem about the {w}, the wind over the hills, the grey sea, the old "
           f"harbour and the boats that come home late in the evening." for w in WORDS]


@pytest.fixture(scope="module")
def tiny(smollm_path):
    s = start_server(smollm_path, "--max-model-len", "128", "--kv-cache-gb", f"{TINY_KV_GB:.6f}",
                     "--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    try:
        yield s
    finally:
        stop_server(s)


def greedy(prompt: str, max_tokens: int = 16, stream: bool = False) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def test_the_marker_does_nothing_without_the_hook(tiny):
    r = httpx.post(tiny.base + "/v1/completions", json=greedy(f"{FAULT_MARKER} x", 2), timeout=60)
    assert r.status_code == 200, r.text


def test_preempted_requests_resume_with_identical_output(tiny):
    with httpx.Client(base_url=tiny.base, timeout=120) as c:
        alone = [c.post("/v1/completions", json=greedy(p, 24)).json() for p in PROMPTS[:6]]
        m0 = wait_idle(tiny)

    async def together():
        async with httpx.AsyncClient(base_url=tiny.base, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json=greedy(p, 24))
                                        for p in PROMPTS[:6]))
            return [r.json() for r in rs]
    both = asyncio.run(together())
    m1 = wait_idle(tiny)
    assert m1["ostinato:num_preemptions_total"] > m0["ostinato:num_preemptions_total"]
    assert [b["choices"][0]["text"] for b in both] == [a["choices"][0]["text"] for a in alone]
    assert all(b["usage"]["completion_tokens"] == 24 for b in both)
    assert m1["ostinato:kv_cache_usage_perc"] == 0


def _stream(base: str, body: dict, first: threading.Event, out: list) -> None:
    events = []
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first.set()
                    events.append(line[6:])
    except httpx.HTTPError as e:
        events.append(f"error: {e!r}")
    out.append(events)


def test_sigterm_refuses_new_finishes_in_flight_then_exits(tiny):
    """Runs last in this module: the server is gone afterwards."""
    results: list = []
    started = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(target=_stream, args=(tiny.base, greedy(p, 12, True), ev,
                                                       results))
               for p, ev in zip(PROMPTS, started)]
    for t in threads:
        t.start()
    assert all(ev.wait(60) for ev in started), "the streams did not start"
    t0 = time.monotonic()
    tiny.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    for _ in range(5):              # a new client is never served: 503 while the listener is
        try:                        # still open, then refused (or reset by the exiting process)
            r = httpx.post(tiny.base + "/v1/completions", json=greedy("Hi", 2), timeout=10)
            assert r.status_code == 503, r.text
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            pass
        time.sleep(0.1)
    for t in threads:
        t.join(SHUTDOWN_TIMEOUT + 10)
    try:
        tiny.proc.wait(SHUTDOWN_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit after SIGTERM:\n{tiny.log()}")
    assert time.monotonic() - t0 < SHUTDOWN_TIMEOUT + 10
    assert len(results) == 3
    for events in results:          # every in-flight stream finished properly
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length", last
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
