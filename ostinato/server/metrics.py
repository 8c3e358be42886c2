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
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_STEP_TOKENS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]

        def gauge(name, doc, *also):
            """also: vLLM's names for the same value (what routers scrape; see VLLM_NAMES)."""
            made = [Gauge(n, doc, lab, registry=r).labels(model_name) for n in (name, *also)]
            return made[0] if not also else _Twins(made)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("ostinato:num_requests_running", "requests being generated",
                             *VLLM_NAMES["running"])
        self.waiting = gauge("ostinato:num_requests_waiting", "requests waiting to start",
                             *VLLM_NAMES["waiting"])
        self.kv_usage = gauge("ostinato:kv_cache_usage_perc", "fraction of KV blocks in use",
                              *VLLM_NAMES["kv_usage"])
        self.prefix_hit = gauge("ostinato:prefix_cache_hit_rate",
                                "prompt tokens served from the prefix cache / prompt tokens",
                                *VLLM_NAMES["prefix_hit"])
        self._add_cache_counts(r, lab, model_name)
        self.slow_paths = gauge("ostinato:slow_paths", "slower paths the loaded model file "
                                "forces (each named in the log at load), e.g. q/k/v of "
                                "different quantization layouts computed one by one")
        self.batch = hist("ostinato:batch_size", "sequences per engine step", _BATCH)
        self.step_seconds = hist("ostinato:step_seconds", "time of one engine step's forward "
                                 "pass (the --target-itl-ms scheduler keeps it in bounds)", _STEP)
        self.step_tokens = hist("ostinato:step_tokens", "tokens computed in one engine step",
                                _STEP_TOKENS)
        self._steps_seen = 0
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
        self.preemptions = Counter("ostinato:num_preemptions", "sequences preempted (KV cache "
                                   "full) and recomputed later", lab, registry=r).labels(model_name)
        # speculative decoding, as vLLM's spec_decode counters (0 while it is off)
        def counter(name, doc):
            return Counter(name, doc, lab, registry=r).labels(model_name)

        off = "; stays 0 when speculative decoding is off"
        self.spec_drafts = counter("ostinato:spec_decode_num_drafts",
                                   "drafts verified (a sequence's step with draft tokens)" + off)
        self.spec_draft_tokens = counter("ostinato:spec_decode_num_draft_tokens",
                                         "draft tokens verified" + off)
        self.spec_accepted_tokens = counter("ostinato:spec_decode_num_accepted_tokens",
                                            "draft tokens accepted (kept)" + off)
        self._spec_per_pos = Counter(
            "ostinato:spec_decode_num_accepted_tokens_per_pos", "draft tokens accepted, by "
            "position in the draft (0: first); no samples when speculative decoding is off",
            lab + ["position"], registry=r)
        self._spec_totals = [Total(c) for c in (self.spec_drafts, self.spec_draft_tokens,
                                                self.spec_accepted_tokens)]
        self._spec_pos_totals: list[Total] = []
        # the prefix cache's disk tier (--kv-cache-dir); no samples while it is off
        self._disk_totals = {
            f: Total(counter(f"ostinato:kv_disk_{f}", doc + "; stays 0 without --kv-cache-dir"))
            for f, doc in DISK_COUNTERS.items()}
        self.disk_bytes = gauge("ostinato:kv_disk_usage_bytes",
                                "bytes the disk tier's directory holds (all models)")
        self.threads = gauge("ostinato:engine_threads", "threads the engine's steps run on "
                             "now (fewer while another process takes a core)")
        self.thread_switches = counter("ostinato:engine_thread_switches",
                                       "times the engine changed its thread count")
        self._switch_total = Total(self.thread_switches)
        # nothing lost: every accepted request settles exactly one outcome, so at rest
        # requests_accepted_total == sum(request_outcomes_total); a gap is a leak
        self.accepted = Counter("ostinato_requests_accepted", "generation requests accepted "
                                "(past validation and the queue limit)", lab, registry=r
                                ).labels(model_name)
        self._outcomes = Counter("ostinato_request_outcomes", "accepted requests by how they "
                                 "ended: completed | error | aborted (client gone, shutdown)",
                                 lab + ["outcome"], registry=r)
        for o in OUTCOMES:                      # present at 0, so rates and sums work at once
            self._outcomes.labels(model_name, o)
        self._preempted = Total(self.preemptions)
        self.model_name = model_name

    def _add_cache_counts(self, r: CollectorRegistry, lab: list[str], model_name: str) -> None:
        """The prefix cache's token counters and the KV layout's info gauge (vLLM's names)."""
        def counters(names, doc):
            return [Counter(n, doc, lab, registry=r).labels(model_name) for n in names]

        # vLLM's names only: ostinato:prefix_cache_queries/hits are the replica ingress's
        # totals (replicas/metrics.py), and a family may be exported once
        self._prefix_queries = Total(*counters(VLLM_NAMES["prefix_queries"],
                                               "prompt tokens looked up in the prefix cache"))
        self._prefix_hits = Total(*counters(VLLM_NAMES["prefix_hits"],
                                            "prompt tokens found in the prefix cache"))
        self._cache_info = Gauge("vllm:cache_config_info", "the KV cache's layout, in vLLM's "
                                 "labels (value 1; the Inference Extension reads block_size "
                                 "and num_gpu_blocks)", lab + ["block_size", "num_gpu_blocks"],
                                 registry=r)

    def cache_config(self, block_size: int, num_blocks: int) -> None:
        """The KV cache's block size (tokens) and block count, once the model is loaded."""
        self._cache_info.labels(self.model_name, str(block_size), str(num_blocks)).set(1)

    def accept(self) -> RequestOutcome:
        self.accepted.inc()
        return RequestOutcome(self)

    def settled(self, outcome: str) -> None:
        self._outcomes.labels(self.model_name, outcome).inc()

    def on_step(self, snap: EngineSnapshot, batch_size: int) -> None:
        """Called on the engine thread (prometheus_client is thread-safe)."""
        self.running.set(snap.running)
        self.waiting.set(snap.waiting)
        self.kv_usage.set(snap.kv_usage)
        if snap.prefix_hit_rate is not None:
            self.prefix_hit.set(snap.prefix_hit_rate)
        self._prefix_queries.to(snap.prefix_queries)
        self._prefix_hits.to(snap.prefix_hits)
        if batch_size:
            self.batch.observe(batch_size)
        if snap.steps > self._steps_seen:           # a step ran since the last snapshot
            self._steps_seen = snap.steps
            self.step_seconds.observe(snap.step_seconds)
            self.step_tokens.observe(snap.step_tokens)
        self._preempted.to(snap.preemptions)
        self._spec(snap)
        if snap.disk is not None:
            for f, total in self._disk_totals.items():
                total.to(getattr(snap.disk, f))
            self.disk_bytes.set(snap.disk_bytes)
        if snap.threads:
            self.threads.set(snap.threads)
            self._switch_total.to(snap.thread_switches)

    def _spec(self, snap: EngineSnapshot) -> None:
        """The spec_decode counters, from the snapshot's totals (engine thread)."""
        for total, new in zip(self._spec_totals, (snap.spec_num_drafts,
                                                  snap.spec_num_draft_tokens,
                                                  snap.spec_num_accepted_tokens)):
            total.to(new)
        per_pos = self._spec_pos_totals
        for pos, new in enumerate(snap.spec_accepted_per_pos):
            if pos == len(per_pos):                 # present from 0
                per_pos.append(Total(self._spec_per_pos.labels(self.model_name, str(pos))))
            per_pos[pos].to(new)

    def track(self, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, num_prompt_tokens)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


OUTCOMES = ("completed", "error", "aborted")
# Our gauges under vLLM's names too, same value and model_name label, for the routers and
# gateways that scrape a vLLM backend (docs/routers.md says which reads which)
VLLM_NAMES = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "prefix_hit": ("vllm:gpu_prefix_cache_hit_rate",),
    "prefix_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
}


class _Twins:
    """One value under several gauge names."""

    def __init__(self, gauges: list):
        self.gauges = gauges

    def set(self, value: float) -> None:
        for g in self.gauges:
            g.set(value)
DISK_COUNTERS = {   # DiskStats fields, as counters
    "blocks_read": "KV blocks read back from the disk tier (prefix hits after a restart or "
                   "an eviction from RAM)",
    "blocks_written": "KV blocks written to the disk tier",
    "blocks_rejected": "disk-tier files that failed a check (torn, corrupt, foreign): "
                       "removed, their blocks computed",
    "blocks_dropped": "KV blocks not written: the disk writer was behind",
    "bytes_read": "bytes read from the disk tier",
    "read_seconds": "seconds spent reading (and checking) disk-tier blocks",
}


class Total:
    """Counters that follow a monotonic total the engine keeps (a snapshot's count): each
    new snapshot adds what the total grew by since the last. Engine thread only."""

    def __init__(self, *counters):
        self.counters, self.seen = counters, 0

    def to(self, total: float) -> None:
        if total > self.seen:
            for c in self.counters:
                c.inc(total - self.seen)
            self.seen = total


class RequestOutcome:
    """One accepted request's terminal outcome: the first settle() counts, later ones are
    no-ops (an error event followed by the stream's end is still one outcome)."""

    def __init__(self, m: ServerMetrics):
        self.m, self.value = m, None

    def settle(self, outcome: str) -> None:
        assert outcome in OUTCOMES, outcome
        if self.value is None:
            self.value = outcome
            self.m.settled(outcome)


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
