"""A multi-tenant chat workload for prefix-aware routing (scripts/replica_hit_rate.py and
tests/server/test_replicas.py): each tenant has a long system prompt of its own; each of its
users asks a short question under it. The hit rate is what the server says it reused:
sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens)."""
from __future__ import annotations

import concurrent.futures as cf
import random
import time

import httpx

WORDS = ("invoice ledger account balance payment refund customer order shipment warehouse "
         "policy contract renewal discount tax region quarter report audit summary").split()


def tenants(seed: int, n: int = 8, words: int = 250) -> list[str]:
    """n system prompts of `words` words, reproducible from seed."""
    rng = random.Random(seed)
    return [f"You are the assistant of tenant {seed}-{t}. Rules: " +
            " ".join(rng.choice(WORDS) for _ in range(words)) for t in range(n)]


def workload(base: str, model: str, systems: list[str], users: int,
             concurrency: int = 4) -> dict:
    """Every user of every tenant asks once (users outer, so tenants interleave); returns the
    hit rate, prompt tokens, requests and seconds."""
    jobs = [(s, u) for u in range(users) for s in systems]

    def one(job):
        s, u = job
        body = {"model": model, "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "system", "content": s},
                             {"role": "user", "content": f"User {u}: what is my balance?"}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} from {base}: {r.text}")
        usage = r.json()["usage"]
        return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(one, jobs))
    cached, total = sum(c for c, _ in got), sum(p for _, p in got)
    return {"hit_rate": cached / total, "prompt_tokens": total, "requests": len(got),
            "seconds": time.perf_counter() - t0}
