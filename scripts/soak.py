"""Soak test: many concurrent mixed clients against a real server, bounded in time.

    python scripts/soak.py                          # starts its own server, 5 minutes
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234 --duration 30

Phases: a short reference run (the same workload and concurrency, no abandoned clients),
then the soak itself (chat and completions, streaming and not; one request in
--abandon-every is given up by its client), then idle. Pass criteria, each reported:
  errors        no failed request except deliberate 503s, and those <= --max-503-frac
  throughput    soak tokens/s >= --min-throughput-ratio x the reference run's
  kv_idle       KV cache usage, running and waiting all back to 0 when idle
  nothing_lost  accepted requests == sum of their outcomes (completed + error + aborted)
  rss           server RSS growth from the first to the last window <= --max-rss-growth
                (windows of min(60 s, duration / 3); needs --pid or a server started here)
Prints one JSON summary; exit status 0 when everything passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from ostinato.bench.server_proc import Launch, ServerProcess, ServerStartError, start_ostinato

PROMPTS = ["Tell me about the {w}.", "Write two lines about the {w}.",
           "What colour is the {w}?", "Name three things that go with the {w}."]
WORDS = ["sun", "moon", "sea", "sky", "tree", "cat", "dog", "bird", "river", "hill", "city", "book"]


@dataclass
class Tally:
    ok: int = 0
    tokens: int = 0
    status_503: int = 0
    abandoned: int = 0
    cut: int = 0                        # still running at the drain deadline: cancelled
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.ok + self.status_503 + self.abandoned + self.cut + len(self.errors)


def request_body(i: int, max_tokens: int, model: str | None) -> tuple[str, dict]:
    """The i-th request of the mix: chat / completions x streaming / not."""
    text = PROMPTS[i % len(PROMPTS)].format(w=WORDS[(i // 4) % len(WORDS)])
    stream = (i // 2) % 2 == 0
    common = {"max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": stream,
              "ignore_eos": True}
    if stream:
        common["stream_options"] = {"include_usage": True}
    if model:
        common["model"] = model
    if i % 2 == 0:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                        **common}
    return "/v1/completions", {"prompt": text, **common}


async def one(c: httpx.AsyncClient, i: int, max_tokens: int, model: str | None,
              tally: Tally, abandon: bool) -> None:
    path, body = request_body(i, max_tokens, model)
    try:
        if abandon:                     # a client that gives up mid-way: not an error
            try:
                await asyncio.wait_for(_send(c, path, body), timeout=0.05 + (i % 5) * 0.05)
            except TimeoutError:
                tally.abandoned += 1
                return
            tally.ok += 1
            return
        status, tokens, error = await _send(c, path, body)
    except httpx.HTTPError as e:
        tally.errors.append(f"{path}: {e!r}")
        return
    if status == 503:
        tally.status_503 += 1
    elif status != 200 or error:
        tally.errors.append(f"{path}: {status} {error}")
    else:
        tally.ok += 1
        tally.tokens += tokens


async def _send(c: httpx.AsyncClient, path: str, body: dict) -> tuple[int, int, str | None]:
    """(status, completion tokens, an error message if the stream carried one)."""
    if not body["stream"]:
        r = await c.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, 0, r.text[:200]
        return 200, r.json()["usage"]["completion_tokens"], None
    tokens, error = 0, None
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, 0, (await r.aread()).decode()[:200]
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return 200, tokens, error


async def run_load(base: str, seconds: float, concurrency: int, max_tokens: int,
                   model: str | None, abandon_every: int, api_key: str | None,
                   drain: float) -> tuple[Tally, float]:
    """Each of `concurrency` workers sends requests back to back until the time is up;
    returns the tally and the server's generated tokens/s while every worker was busy
    (from its counter, between the end of a ramp-up and the deadline: the tail, where
    fewer requests are left in flight, would otherwise count against short runs)."""
    tally, counter = Tally(), iter(range(1 << 62))
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(c):
        while time.monotonic() < deadline:
            i = next(counter)
            await one(c, i, max_tokens, model, tally,
                      abandon=abandon_every > 0 and i % abandon_every == abandon_every - 1)

    async def rate() -> float:
        # a connection of its own: the workers' pool is always full
        async with httpx.AsyncClient(base_url=base, timeout=60) as m:
            await asyncio.sleep(min(5.0, seconds * 0.2))    # ramp-up: prompts prefilling
            t1, n1 = time.monotonic(), await generated(m)
            await asyncio.sleep(max(0.1, deadline - time.monotonic()))
            t2, n2 = time.monotonic(), await generated(m)
        return (n2 - n1) / (t2 - t1)

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits,
                                 headers=headers) as c:
        workers = [asyncio.ensure_future(worker(c)) for _ in range(concurrency)]
        tps = await rate()
        # the requests in flight at the deadline may finish within `drain` seconds
        _, late = await asyncio.wait(workers, timeout=max(0.1, deadline + drain -
                                                          time.monotonic()))
        for t in late:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        tally.cut = len(late)
    return tally, tps


async def generated(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("ostinato:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("no ostinato:generation_tokens_total in /metrics")


def metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[s.name + (f"[{s.labels['outcome']}]" if "outcome" in s.labels else "")] = s.value
    return out


def wait_idle(base: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        settled = m["ostinato_requests_accepted_total"] == sum(
            v for k, v in m.items() if k.startswith("ostinato_request_outcomes_total["))
        idle = (m["ostinato:num_requests_running"] == 0 and
                m["ostinato:num_requests_waiting"] == 0 and m["ostinato:kv_cache_usage_perc"] == 0)
        if (settled and idle) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


class RSSSampler(threading.Thread):
    """The server's resident set size once a second, from /proc (Linux)."""

    def __init__(self, pid: int | None):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def rss(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def run(self) -> None:
        while self.pid and not self.stop.is_set():
            r = self.rss()
            if r is not None:
                self.samples.append((time.monotonic(), r))
            self.stop.wait(1.0)

    def growth(self, window: float) -> tuple[float, int, int] | None:
        """(growth, first window's median, last window's median), None without samples."""
        if len(self.samples) < 3:
            return None
        t0, t1 = self.samples[0][0], self.samples[-1][0]
        first = [r for t, r in self.samples if t <= t0 + window]
        last = [r for t, r in self.samples if t >= t1 - window]
        a, b = int(statistics.median(first)), int(statistics.median(last))
        return b / a - 1, a, b


def start_server(model: str, threads: int, extra: list[str]) -> ServerProcess:
    how = Launch(log_prefix="ostinato-soak-", timeout=300, grace_s=60)
    try:
        srv = start_ostinato(model, *extra, threads=threads, how=how)
    except ServerStartError as e:
        sys.exit(f"soak: {e}")
    print(f"soak: server at {srv.base} (log {srv.log_path})", file=sys.stderr)
    return srv


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="an already running server (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="its process id, for the RSS check")
    p.add_argument("--model", default="smollm2-135m-instruct", help="for a server started here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `ostinato serve` argument for a server started here")
    p.add_argument("--api-key", default=os.environ.get("OSTINATO_API_KEY") or None)
    p.add_argument("--duration", type=float, default=300, help="soak seconds")
    p.add_argument("--reference", type=float, default=20, help="reference-run seconds")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--drain", type=float, default=60,
                   help="seconds the requests in flight at the end of a phase may take to "
                        "finish; those still running then are cancelled (reported as cut)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--abandon-every", type=int, default=25,
                   help="one request in N is given up by its client (0: none)")
    p.add_argument("--min-throughput-ratio", type=float, default=0.8)
    p.add_argument("--max-503-frac", type=float, default=0.01)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--json", default=None, help="also write the summary here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    srv = None
    if a.url is None:
        srv = start_server(a.model, a.threads, a.server_arg)
        base, pid = srv.base, srv.proc.pid
    else:
        base, pid = a.url.rstrip("/"), a.pid
    try:
        return soak(a, base, pid)
    finally:
        if srv is not None:
            srv.stop()


def soak(a: argparse.Namespace, base: str, pid: int | None) -> int:
    model = None
    run = lambda secs, abandon: asyncio.run(run_load(
        base, secs, a.concurrency, a.max_tokens, model, abandon, a.api_key, a.drain))
    print(f"soak: reference run, {a.reference:.0f} s at concurrency {a.concurrency}",
          file=sys.stderr)
    t0 = time.monotonic()
    ref, ref_tps = run(a.reference, 0)
    ref_s = time.monotonic() - t0
    before = wait_idle(base)
    rss = RSSSampler(pid)
    rss.start()
    print(f"soak: {a.duration:.0f} s", file=sys.stderr)
    t0 = time.monotonic()
    tally, soak_tps = run(a.duration, a.abandon_every)
    soak_s = time.monotonic() - t0
    rss.stop.set()
    rss.join()
    after = wait_idle(base)
    window = min(60.0, a.duration / 3)
    growth = rss.growth(window)
    accepted = after["ostinato_requests_accepted_total"]
    settled = sum(v for k, v in after.items() if k.startswith("ostinato_request_outcomes_total["))
    frac_503 = tally.status_503 / max(1, tally.requests)
    checks = {
        "errors": not tally.errors and not ref.errors and frac_503 <= a.max_503_frac,
        "throughput": ref_tps > 0 and soak_tps >= a.min_throughput_ratio * ref_tps,
        "kv_idle": after["ostinato:kv_cache_usage_perc"] == 0 and
                   after["ostinato:num_requests_running"] == 0 and
                   after["ostinato:num_requests_waiting"] == 0,
        "nothing_lost": accepted == settled,
        "rss": growth is None or growth[0] <= a.max_rss_growth,
    }
    summary = {
        "passed": all(checks.values()), "checks": checks,
        "concurrency": a.concurrency, "duration_s": round(soak_s, 1),
        "reference_s": round(ref_s, 1),
        "requests": tally.requests, "ok": tally.ok, "status_503": tally.status_503,
        "frac_503": round(frac_503, 4), "abandoned": tally.abandoned, "cut": ref.cut + tally.cut,
        "errors": (ref.errors + tally.errors)[:10], "num_errors": len(ref.errors + tally.errors),
        "reference_tokens_per_s": round(ref_tps, 1), "soak_tokens_per_s": round(soak_tps, 1),
        "throughput_ratio": round(soak_tps / ref_tps, 3) if ref_tps else None,
        "min_throughput_ratio": a.min_throughput_ratio,
        "rss_growth": None if growth is None else round(growth[0], 4),
        "rss_first_mb": None if growth is None else round(growth[1] / 2**20, 1),
        "rss_last_mb": None if growth is None else round(growth[2] / 2**20, 1),
        "rss_window_s": window,
        # this phase's requests (the check above compares the server's totals)
        "accepted": accepted - before.get("ostinato_requests_accepted_total", 0), "outcomes": {
            k.split("[")[1][:-1]: v - before.get(k, 0) for k, v in after.items()
            if k.startswith("ostinato_request_outcomes_total[")},
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
