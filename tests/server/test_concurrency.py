"""Many users at once: batching gives each the same answer as alone; clients that vanish
have their requests aborted and their KV blocks freed."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.model
PROMPTS = [f"Fact number {i}: the {w} is" for i, w in enumerate(
    "sun moon sea sky tree cat dog bird fish rock rain snow wind fire ice sand "
    "road city king queen book song river hill".split())]


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped; buckets keyed by their le)."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(server.base + "/metrics").text):
        for s in fam.samples:
            key = s.name + (f"[{s.labels['le']}]" if "le" in s.labels else "")
            if "finished_reason" in s.labels:
                key += f"[{s.labels['finished_reason']}]"
            out[key] = s.value
    return out


def steps_over(m: dict, size: int) -> float:
    """Engine steps that ran more than `size` sequences together."""
    return m["ostinato:batch_size_count"] - m[f"ostinato:batch_size_bucket[{float(size)}]"]


async def _greedy(c, server, prompt):
    r = await c.completions.create(model=server.model, prompt=prompt, max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_24_concurrent_equal_each_alone(aclient, server):
    async def run():
        async with aclient() as c:
            alone = [await _greedy(c, server, p) for p in PROMPTS]
            before = metrics(server)
            together = await asyncio.gather(*(_greedy(c, server, p) for p in PROMPTS))
            return alone, before, together
    assert len(PROMPTS) == 24
    alone, before, together = asyncio.run(run())
    assert together == alone
    after = metrics(server)
    # they ran batched (the server's step-time target admits a burst's prompts a few a
    # step while the first ones decode, so not necessarily 8 at once)
    assert steps_over(after, 2) - steps_over(before, 2) >= 3
    assert after["ostinato:generation_tokens_total"] - \
        before["ostinato:generation_tokens_total"] == 24 * 6


def test_async_streaming_equals_non_streamed(aclient, server):
    msgs = [{"role": "user", "content": "Name three colours."}]

    async def run():
        async with aclient() as c:
            full = await c.chat.completions.create(model=server.model, messages=msgs,
                                                   max_tokens=12, temperature=0)
            stream = await c.chat.completions.create(
                model=server.model, messages=msgs, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True})
            return full, [chunk async for chunk in stream]
    full, chunks = asyncio.run(run())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sync_streaming_n_choices(client, server):
    chunks = list(client.completions.create(
        model=server.model, prompt=["Red, green,", "One, two,"], max_tokens=5, n=2,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", "", "", ""], [[], [], [], []]
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
            finishes[ch.index] += [ch.finish_reason] if ch.finish_reason else []
    assert all(len(f) == 1 for f in finishes)
    full = client.completions.create(model=server.model, prompt=["Red, green,", "One, two,"],
                                     max_tokens=5, n=2, temperature=0)
    assert texts == [c.text for c in full.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


async def _stream_then_vanish(base: str, headers: dict, body: dict, after: float) -> int:
    """Start a stream, read it for `after` seconds, then drop the connection."""
    got = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as c:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            try:
                async with asyncio.timeout(after):
                    async for _ in r.aiter_bytes():
                        got += 1
            except TimeoutError:
                pass
    return got


def test_disconnected_streams_are_aborted(client, server):
    before = metrics(server)
    body = {"model": server.model, "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}

    async def run():
        await asyncio.gather(*(_stream_then_vanish(
            server.base, headers, {**body, "prompt": p}, 0.2) for p in PROMPTS[:20]))
    asyncio.run(run())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:                      # aborts land within a step
        m = metrics(server)
        if m["ostinato:requests_aborted_total"] - before["ostinato:requests_aborted_total"] >= 20 \
                and m["ostinato:kv_cache_usage_perc"] == 0.0 \
                and m["ostinato:num_requests_running"] == m["ostinato:num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert m["ostinato:requests_aborted_total"] - before["ostinato:requests_aborted_total"] == 20
    assert m["ostinato:num_requests_running"] == m["ostinato:num_requests_waiting"] == 0
    assert m["ostinato:kv_cache_usage_perc"] == 0.0           # every block back in the pool
    # far fewer tokens than 20 x 400: generation stopped when the clients left
    made = m["ostinato:generation_tokens_total"] - before["ostinato:generation_tokens_total"]
    assert made < 20 * 100
    t0 = time.monotonic()
    r = client.completions.create(model=server.model, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens > 0 and time.monotonic() - t0 < 5


def test_disconnected_non_streaming_request_is_aborted(server):
    before = metrics(server)
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 500,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/completions", json=body, timeout=0.5,
                   headers={"Authorization": f"Bearer {server.api_key}"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["ostinato:requests_aborted_total"] > before["ostinato:requests_aborted_total"] \
                and m["ostinato:num_requests_running"] == 0 \
                and m["ostinato:kv_cache_usage_perc"] == 0.0:
            break
        time.sleep(0.1)
    assert m["ostinato:requests_aborted_total"] == before["ostinato:requests_aborted_total"] + 1
    assert m["ostinato:num_requests_running"] == 0 and m["ostinato:kv_cache_usage_perc"] == 0.0
    # it stopped early: nowhere near its 500 tokens
    assert m["ostinato:generation_tokens_total"] - before["ostinato:generation_tokens_total"] < 400
