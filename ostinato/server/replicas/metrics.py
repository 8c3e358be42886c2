"""/metrics for several replicas: every replica's samples with a `replica` label, and beside
them the aggregate (no `replica` label): counters, histograms and request gauges summed,
kv_cache_usage_perc averaged, prefix_cache_hit_rate recomputed from the replicas' prompt
tokens looked up and found (a mean of rates would weigh an idle replica like a busy one)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

HIT_RATES = ("ostinato:prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate")
MEANS = ("ostinato:kv_cache_usage_perc", "vllm:kv_cache_usage_perc",
         "vllm:gpu_cache_usage_perc", "vllm:cache_config_info")


@dataclass
class ReplicaMetrics:
    rank: int
    text: str                   # the replica's own /metrics
    prefix_queries: int         # prompt tokens looked up in its prefix cache
    prefix_hits: int            # of those, found


def merge(replicas: list[ReplicaMetrics], expected: int) -> str:
    """One Prometheus text exposition for all replicas; `expected` replicas were asked for
    (ostinato:replicas_up says how many answered)."""
    families: dict[str, tuple[str, str, list]] = {}      # name -> (type, help, samples)
    for rep in replicas:
        for fam in text_string_to_metric_families(rep.text):
            if fam.name.endswith("_created"):         # creation times: nothing to add up
                continue
            kind, doc, samples = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            samples += [(rep.rank, s) for s in fam.samples if not s.name.endswith("_created")]
    lines = [_family("ostinato:replicas", "gauge", "engine replicas configured",
                     [("ostinato:replicas", expected)]),
             _family("ostinato:replicas_up", "gauge", "replicas whose metrics were read",
                     [("ostinato:replicas_up", len(replicas))])]
    for name, (kind, doc, samples) in families.items():
        rows = _aggregate(name, samples, replicas)
        rows += [(_sample_name(s.name, {**s.labels, "replica": str(rank)}), s.value)
                 for rank, s in samples]
        lines.append(_family(name, kind, doc, rows))
    queries = sum(r.prefix_queries for r in replicas)
    hits = sum(r.prefix_hits for r in replicas)
    lines.append(_family("ostinato:prefix_cache_queries", "counter", "prompt tokens looked up "
                         "in the prefix cache, all replicas",
                         [("ostinato:prefix_cache_queries_total", queries)]))
    lines.append(_family("ostinato:prefix_cache_hits", "counter", "of those, tokens found",
                         [("ostinato:prefix_cache_hits_total", hits)]))
    return "".join(lines)


def _aggregate(name: str, samples: list, replicas: list[ReplicaMetrics]) -> list:
    """The samples summed over replicas (same name and labels), or their mean or rate."""
    if name in HIT_RATES:
        q = sum(r.prefix_queries for r in replicas)
        rate = sum(r.prefix_hits for r in replicas) / q if q else 0.0
        labels = {k: v for k, v in samples[0][1].labels.items()} if samples else {}
        return [(_sample_name(name, labels), rate)] if samples else []
    total: dict[tuple, list[float]] = {}
    for _, s in samples:
        total.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s.value)
    mean = name in MEANS
    return [(_sample_name(n, dict(labels)), sum(v) / len(v) if mean else sum(v))
            for (n, labels), v in total.items()]


def _sample_name(name: str, labels: dict) -> str:
    if not labels:
        return name
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{body}}}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, doc: str, rows: list) -> str:
    head = f"# HELP {name} {_escape(doc)}\n# TYPE {name} {kind}\n"
    return head + "".join(f"{n} {_number(v)}\n" for n, v in rows)


def _number(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    return ("+Inf" if v > 0 else "-Inf") if math.isinf(v) else repr(v)
