"""Faults: clients that give up, a fault inside one request's own processing, and the
bookkeeping that proves nothing is lost (accepted == completed + error + aborted)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from reliability_support import FAULT_MARKER, outcomes, wait_idle

pytestmark = pytest.mark.model
PROMPTS = ["The capital of France is", "One, two, three,", "Roses are red,",
           "My favourite food is", "The sky is", "Once upon a time"]


def body(prompt: str, stream: bool, max_tokens: int = 8) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def run_one(c: httpx.AsyncClient, b: dict) -> tuple[int, str, list]:
    """(status, text, SSE events or [the JSON body])."""
    if not b.get("stream"):
        r = await c.post("/v1/completions", json=b)
        j = r.json()
        text = j["choices"][0]["text"] if r.status_code == 200 else ""
        return r.status_code, text, [j]
    events = []
    async with c.stream("POST", "/v1/completions", json=b) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return r.status_code, text, events


def delta(before: dict, after: dict) -> dict:
    b, a = outcomes(before), outcomes(after)
    out = {k: a[k] - b[k] for k in a}
    out["accepted"] = (after["ostinato_requests_accepted_total"] -
                       before["ostinato_requests_accepted_total"])
    return out


def test_injected_fault_fails_only_its_own_request(rserver):
    async def go():
        async with httpx.AsyncClient(base_url=rserver.base, timeout=60) as c:
            alone = [(await run_one(c, body(p, False)))[1] for p in PROMPTS]
            before = wait_idle(rserver)
            jobs = [body(p, i % 2 == 1) for i, p in enumerate(PROMPTS)]
            jobs += [body(f"Count: {FAULT_MARKER} one", False),
                     body(f"Count: {FAULT_MARKER} two", True)]
            results = await asyncio.gather(*(run_one(c, j) for j in jobs))
            return alone, before, results
    alone, before, results = asyncio.run(go())
    healthy, (plain_fault, stream_fault) = results[:len(PROMPTS)], results[len(PROMPTS):]
    assert [r[1] for r in healthy] == alone             # the others did not notice
    assert all(r[0] == 200 for r in healthy)
    assert plain_fault[0] == 500, plain_fault
    assert "FaultInjected" in plain_fault[2][0]["error"]["message"]
    assert stream_fault[0] == 200                       # the status line went first
    assert stream_fault[2][-1]["error"]["code"] == 500, stream_fault[2]
    d = delta(before, wait_idle(rserver))
    assert d == {"completed": len(PROMPTS), "error": 2, "aborted": 0,
                 "accepted": len(PROMPTS) + 2}


PATIENCE = 0.05


def test_200_impatient_clients_are_all_aborted(rserver):
    """Clients that give up 0.05 s after they start, whatever has arrived by then (12 tokens
    take longer even alone: 80 ms on a Zen 5 VM, our fastest; the server caps max_tokens at
    12): every accepted request ends as aborted, the KV cache empties, and the next request
    is answered within 5 s. The deadline is on the whole request, not httpx's timeout alone,
    which is per read: a stream whose tokens come less than 0.05 s apart never trips it (on
    Zen 5 one of these clients got all 12 tokens that way)."""
    before = wait_idle(rserver)

    async def impatient(c: httpx.AsyncClient, i: int) -> None:
        b = body(f"Story {i}: once upon a time", i % 2 == 0, max_tokens=12)
        try:
            async with asyncio.timeout(PATIENCE):
                r = await run_one(c, b)
        except (TimeoutError, httpx.TimeoutException):
            return
        raise AssertionError(f"request {i} finished within {PATIENCE} s: {r}")

    async def go():
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=rserver.base, timeout=PATIENCE, limits=limits) as c:
            for wave in range(4):           # 4 x 50 at once
                await asyncio.gather(*(impatient(c, wave * 50 + i) for i in range(50)))
    asyncio.run(go())
    after = wait_idle(rserver, timeout=30)
    d = delta(before, after)
    assert d["completed"] == 0 and d["error"] == 0, d
    assert d["aborted"] == d["accepted"] > 0, d       # some never got past the body read
    assert after["ostinato:kv_cache_usage_perc"] == 0
    t0 = time.monotonic()
    r = httpx.post(rserver.base + "/v1/completions", json=body("Hello there", False, 4),
                   timeout=5)
    assert r.status_code == 200 and time.monotonic() - t0 < 5


def test_nothing_lost_under_mixed_load_with_disconnects(rserver):
    """Streaming and not, finished, faulted, refused (400) and abandoned mid-stream:
    afterwards the server's accepted count equals the sum of its outcomes, and each
    outcome count equals what the clients saw."""
    before = wait_idle(rserver)

    async def abandon_stream(c, i):
        async with c.stream("POST", "/v1/completions",
                            json=body(f"Tale {i}: long ago", True, 12)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return "abandoned"          # leaves after the first event

    async def abandon_plain(c, i):
        try:
            await asyncio.wait_for(run_one(c, body(f"Tale {i}: far away", False, 12)), 0.3)
        except TimeoutError:
            return "abandoned"
        return "completed"

    async def normal(c, i):
        status, _, events = await run_one(c, body(PROMPTS[i % len(PROMPTS)], i % 2 == 0, 6))
        if status == 400:
            return "refused"
        if events and "error" in events[-1]:
            return "error"
        return "completed" if status == 200 else f"status {status}"

    async def go():
        async with httpx.AsyncClient(base_url=rserver.base, timeout=60) as c:
            tasks = []
            for i in range(36):
                kind = i % 6
                if kind == 0:
                    tasks.append(abandon_stream(c, i))
                elif kind == 1:
                    tasks.append(abandon_plain(c, i))
                elif kind == 2:
                    b = body(f"{FAULT_MARKER} {i}", i % 4 == 2)
                    tasks.append(run_one(c, b))
                elif kind == 3:                 # over --max-tokens-limit: never accepted
                    tasks.append(normal_refused(c, i))
                else:
                    tasks.append(normal(c, i))
            return await asyncio.gather(*tasks)

    async def normal_refused(c, i):
        r = await c.post("/v1/completions", json=body("Hi", False, 1000))
        return "refused" if r.status_code == 400 else f"status {r.status_code}"

    results = asyncio.run(go())
    after = wait_idle(rserver, timeout=30)
    d = delta(before, after)
    assert d["accepted"] == d["completed"] + d["error"] + d["aborted"], d
    said = [r if isinstance(r, str) else ("error" if r[0] == 500 or "error" in r[2][-1]
                                          else "completed") for r in results]
    assert said.count("refused") == 6 and not [s for s in said if s.startswith("status")]
    assert d["accepted"] == 30, d
    assert d["error"] == said.count("error") == 6, d
    # an abandoned one may have finished before its client left: completed, not aborted
    assert d["completed"] + d["aborted"] == said.count("completed") + said.count("abandoned")
    assert d["aborted"] <= said.count("abandoned")
    assert after["ostinato:kv_cache_usage_perc"] == 0
