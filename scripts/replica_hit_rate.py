"""Prefix-cache hit rate of a multi-tenant workload: one engine (the single-process server)
against two Ray Serve replicas with prefix-aware, least-loaded and random routing.

    python scripts/replica_hit_rate.py [--tenants 8] [--words 1000] [--users 8]

Each tenant has a long system prompt of its own (--words words, about 1,000+ tokens at the
default); each of its users asks a short question under it. The hit rate is what the server
says it reused: sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens).
Every routing policy gets fresh replicas and prompts of its own (no cache carries over)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ostinato.bench.server_proc import free_port, start_ostinato
from ostinato.bench.tenants import tenants, workload
from ostinato.hub import resolve_model

NAME = "smollm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--words", type=int, default=1000)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()
    import ray
    from ray import serve

    from ostinato.server.replicas.ray_app import replica_app
    model = str(resolve_model(a.model))
    llm_args = {"max_model_len": 4096, "kv_cache_gb": 1.0}
    rows = {}
    srv = start_ostinato(model, "--served-model-name", NAME, "--max-model-len", "4096",
                         threads=1, model_id=NAME)
    try:
        rows["one engine"] = workload(srv.base, NAME, tenants(0, a.tenants, a.words), a.users,
                                      a.concurrency)
    finally:
        srv.stop()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for seed, routing in enumerate(("prefix", "least-loaded", "random"), start=1):
            serve.run(replica_app(model, replicas=2, threads=1, routing=routing,
                                  served_model_name=NAME, **llm_args), name=f"hits-{routing}",
                      route_prefix="/")
            rows[f"2 replicas, {routing}"] = workload(
                f"http://127.0.0.1:{port}", NAME, tenants(seed, a.tenants, a.words), a.users,
                a.concurrency)
            serve.delete(f"hits-{routing}")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{a.tenants} tenants x {a.users} users, system prompts of {a.words} words, "
          f"{Path(model).name}, 1 thread per engine", file=sys.stderr)
    print("| setup | prefix-cache hit rate | prompt tokens | requests | seconds |\n"
          "|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['hit_rate']:.3f} | {r['prompt_tokens']} | {r['requests']} | "
              f"{r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
