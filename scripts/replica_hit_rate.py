"""Prefix-cache hit rate of a multi-tenant workload: one engine (the single-process server)
against two Ray Serve replicas with prefix-aware, least-loaded and random routing.

    python scripts/replica_hit_rate.py [--tenants 8] [--words 1000] [--users 8]

Each tenant has a long system prompt of its own (--words words, about 1,000+ tokens at the
default); each of its users asks a short question under it. The hit rate is what the server
says it reused: sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens).
Every routing policy gets fresh replicas and prompts of its own (no cache carries over)."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import sys
import time
from pathlib import Path

import httpx

from ostinato.bench.server_proc import free_port, start_ostinato
from ostinato.hub import resolve_model

NAME = "smollm"
WORDS = ("invoice ledger account balance payment refund customer order shipment warehouse "
         "policy contract renewal discount tax region quarter report audit summary").split()


def tenants(seed: int, n: int, words: int) -> list[str]:
    rng = random.Random(seed)
    return [f"You are the assistant of tenant {seed}-{t}. Rules: " +
            " ".join(rng.choice(WORDS) for _ in range(words)) for t in range(n)]


def workload(base: str, systems: list[str], users: int, concurrency: int) -> dict:
    jobs = [(s, u) for u in range(users) for s in systems]

    def one(job):
        s, u = job
        body = {"model": NAME, "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "system", "content": s},
                             {"role": "user", "content": f"User {u}: what is my balance?"}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        usage = r.json()["usage"]
        return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(one, jobs))
    cached, total = sum(c for c, _ in got), sum(p for _, p in got)
    return {"hit_rate": cached / total, "prompt_tokens": total, "requests": len(got),
            "seconds": time.perf_counter() - t0}


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
        rows["one engine"] = workload(srv.base, tenants(0, a.tenants, a.words), a.users,
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
                f"http://127.0.0.1:{port}", tenants(seed, a.tenants, a.words), a.users,
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
