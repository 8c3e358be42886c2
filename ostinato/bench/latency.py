"""Latency at batch 1, in process: time to first token for several prompt lengths, decode
speed and inter-token latency, optionally side by side with llama.cpp on the same GGUF file.
Engines are interleaved run by run, so a noisy machine hits both alike; the ratio is the
figure to quote."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..engine.stats import percentile
from ..params import SamplingParams

_WORDS = ["river", "stone", "lantern", "orbit", "velvet", "signal", "harbor", "meadow", "copper",
          "thunder", "quiet", "engine", "paper", "window", "garden", "silver", "method", "number",
          "circle", "yellow", "bridge", "forest"]


def synthetic_words(n_words: int, salt: int) -> str:
    """Word salad, different for each salt (so no two prompts share a prefix)."""
    words, i = [f"Document {salt}:"], salt
    for _ in range(n_words):
        i = (i * 1103515245 + 12345) % (1 << 31)
        words.append(_WORDS[i % len(_WORDS)])
    return " ".join(words)


def synthetic_prompt(llm, n_tokens: int, salt: int) -> list[int]:
    """Exactly n_tokens token ids of word salad."""
    n_words = n_tokens
    while True:
        ids = llm.tokenize(synthetic_words(n_words, salt), add_special_tokens=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        n_words *= 2


@dataclass
class Run:
    start: float
    token_times: list[float]        # when each token arrived

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def decode_tok_s(self) -> float:
        t = self.token_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0


class Ours:
    name = "ostinato"

    def __init__(self, llm):
        self.llm = llm

    def run(self, prompt: list[int], max_tokens: int) -> Run:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start, times = time.perf_counter(), []
        for d in self.llm.stream_deltas(prompt, params):
            now = time.perf_counter()
            times.extend([now] * len(d.token_ids))
        return Run(start, times)


class LlamaCpp:
    """llama.cpp through llama-cpp-python, pinned: same GGUF, 2 threads, n_ctx 4096,
    n_batch 512, no logits_all (an optional peer: `make install-peers`)."""
    name = "llama.cpp"

    def __init__(self, path, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(path), n_ctx=4096, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)

    def run(self, prompt: list[int], max_tokens: int) -> Run:
        self.llm.reset()                        # no KV reuse from the previous run
        start, times = time.perf_counter(), []
        for _ in self.llm.generate(prompt, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == max_tokens:
                break
        return Run(start, times)


def latency(engines, llm, prompt_lengths: list[int], decode_tokens: int, repeats: int,
            salt: int = 0) -> dict:
    """Per engine: median TTFT per prompt length, median decode tok/s, ITL p50/p99 (ms).
    salt: another run's prompts (a second run must not hit the first one's prefix cache)."""
    ttft = {e.name: {n: [] for n in prompt_lengths} for e in engines}
    rate = {e.name: [] for e in engines}
    gaps = {e.name: [] for e in engines}
    for r in range(repeats):
        for n in prompt_lengths:
            prompt = synthetic_prompt(llm, n, salt + 10_000 * r + n)
            for e in engines:
                ttft[e.name][n].append(e.run(prompt, 1).ttft)
        short = synthetic_prompt(llm, 16, salt + 100 + r)
        for e in engines:
            run = e.run(short, decode_tokens + 1)
            rate[e.name].append(run.decode_tok_s)
            gaps[e.name].extend(run.gaps)
    return {e.name: {"ttft_s": {str(n): statistics.median(ttft[e.name][n]) for n in prompt_lengths},
                     "decode_tok_s": statistics.median(rate[e.name]),
                     "itl_p50_ms": 1e3 * percentile(gaps[e.name], 50),
                     "itl_p99_ms": 1e3 * percentile(gaps[e.name], 99)}
            for e in engines}


OUTSIDE_THE_PLAN = "outside the plan (LM head, sampling, Python)"


def batched(llm, n_prompts: int, prompt_tokens: int, max_tokens: int) -> tuple[float, dict]:
    """Offline aggregate tok/s for n_prompts generated together (LLM.generate), and where the
    time went: each stage of the compiled plan's share of the wall time (the Plan's own
    stopwatch), the rest outside it. Empty shares when the model runs without a plan."""
    prompts = [synthetic_prompt(llm, prompt_tokens, 1000 + i) for i in range(n_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    plan = getattr(llm.engine.runner.forward, "plan", None)
    if plan is not None:
        plan.set_profile(True)
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        stages = plan.profile() if plan is not None else {}
    finally:
        if plan is not None:
            plan.set_profile(False)
    shares = {k: v / wall for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    if shares:
        shares[OUTSIDE_THE_PLAN] = max(0.0, 1.0 - sum(shares.values()))
    return sum(len(o.outputs[0].token_ids) for o in outs) / wall, shares
