"""Prometheus metrics, on a registry of the app's own (several apps may live in one process,
as in tests). Names follow vLLM's with an `ostinato:` prefix, so its dashboards adapt easily."""
from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..engine.async_engine import EngineSnapshot

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, lab, registry=r).labels(model_name)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("ostinato:num_requests_running", "requests being generated")
        self.waiting = gauge("ostinato:num_requests_waiting", "requests waiting to start")
        self.kv_usage = gauge("ostinato:kv_cache_usage_perc", "fraction of KV blocks in use")
        self.prefix_hit = gauge("ostinato:prefix_cache_hit_rate",
                                "prompt tokens served from the prefix cache / prompt tokens")
        self.batch = hist("ostinato:batch_size", "sequences per engine step", _BATCH)
        self.ttft = hist("ostinato:time_to_first_token_seconds", "arrival to first token",
                         _LATENCY)
        self.itl = hist("ostinato:inter_token_latency_seconds", "gap between tokens of a choice",
                        _TOKEN_GAP)
        self.e2e = hist("ostinato:e2e_request_latency_seconds", "arrival to last token",
                        _LATENCY)
        self.prompt_tokens = Counter("ostinato:prompt_tokens", "prefilled prompt tokens", lab,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("ostinato:generation_tokens", "generated tokens", lab,
                                         registry=r).labels(model_name)
        self._success = Counter("ostinato:request_success", "finished requests",
                                lab + ["finished_reason"], registry=r)
        self.aborted = Counter("ostinato:requests_aborted", "requests dropped before finishing "
                               "(client gone or error)", lab, registry=r).labels(model_name)
        self.model_name = model_name

    def on_step(self, snap: EngineSnapshot, batch_size: int) -> None:
        """Called on the engine thread (prometheus_client is thread-safe)."""
        self.running.set(snap.running)
        self.waiting.set(snap.waiting)
        self.kv_usage.set(snap.kv_usage)
        if snap.prefix_hit_rate is not None:
            self.prefix_hit.set(snap.prefix_hit_rate)
        if batch_size:
            self.batch.observe(batch_size)

    def track(self, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, num_prompt_tokens)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one HTTP request (all its prompts and choices)."""

    def __init__(self, m: ServerMetrics, num_prompt_tokens: int):
        self.m, self.num_prompt_tokens = m, num_prompt_tokens
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: dict[int, float] = {}        # choice index -> time of its latest token

    def tokens(self, choice: int, n: int) -> None:
        if n == 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
            self.m.prompt_tokens.inc(self.num_prompt_tokens)
        if choice in self.last:
            self.m.itl.observe((now - self.last[choice]) / n)
        self.last[choice] = now
        self.m.generation_tokens.inc(n)

    def done(self, reasons: list[str]) -> None:
        if self.first is None:                  # scoring only (max_tokens 0): no tokens
            self.m.prompt_tokens.inc(self.num_prompt_tokens)
        self.m.e2e.observe(time.perf_counter() - self.start)
        for r in reasons:
            self.m.finished(r)

    def aborted(self) -> None:
        self.m.aborted.inc()
