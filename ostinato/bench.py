"""`ostinato bench`: time to first token, batch-1 decode speed and a batched figure, optionally
side by side with llama.cpp on the same GGUF file (`--vs llama.cpp`), interleaved run by run so
a noisy machine hits both alike; the ratio is the figure to quote."""
from __future__ import annotations

import json
import statistics
import time

from .params import SamplingParams

_WORDS = ("river stone lantern orbit velvet signal harbor meadow copper thunder quiet "
          "engine paper window garden silver method number circle yellow bridge forest").split()


def synthetic_prompt(llm, n_tokens: int, salt: int) -> list[int]:
    """n_tokens of word salad, different for each salt (so no two prompts share a prefix)."""
    words, i = [f"Document {salt}:"], salt
    while True:
        i = (i * 1103515245 + 12345) % (1 << 31)
        words.append(_WORDS[i % len(_WORDS)])
        ids = llm.tokenize(" ".join(words), add_special_tokens=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]


class Ours:
    name = "ostinato"

    def __init__(self, llm):
        self.llm = llm

    def run(self, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
        """(seconds to first token, seconds for the rest, tokens after the first)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0, first, n = time.perf_counter(), None, 0
        for d in self.llm.stream_deltas(prompt, params):
            n += len(d.token_ids)
            first = first or time.perf_counter()
        return first - t0, time.perf_counter() - first, n - 1


class LlamaCpp:
    """llama.cpp through llama-cpp-python, pinned: same GGUF, 2 threads, n_ctx 4096,
    n_batch 512, no logits_all (an optional peer: `make install-peers`)."""
    name = "llama.cpp"

    def __init__(self, path, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(path), n_ctx=4096, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)

    def run(self, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
        self.llm.reset()                        # no KV reuse from the previous run
        t0, first, n = time.perf_counter(), None, 0
        for _ in self.llm.generate(prompt, temp=0.0, reset=True):
            n += 1
            first = first or time.perf_counter()
            if n == max_tokens:
                break
        return first - t0, time.perf_counter() - first, n - 1


def _median(engine, prompts, max_tokens, pick) -> float:
    return statistics.median(pick(engine.run(p, max_tokens)) for p in prompts)


def latency(engines, llm, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    """Interleaved: each repeat runs every engine on the same fresh prompt."""
    out = {e.name: {"ttft": [], "decode": []} for e in engines}
    for r in range(repeats):
        long_p = synthetic_prompt(llm, prompt_tokens, 10 + r)
        short_p = synthetic_prompt(llm, 16, 100 + r)
        for e in engines:
            out[e.name]["ttft"].append(e.run(long_p, 1)[0])
            _, rest, n = e.run(short_p, decode_tokens + 1)
            out[e.name]["decode"].append(n / rest)
    return {name: {"ttft_s": statistics.median(v["ttft"]),
                   "decode_tok_s": statistics.median(v["decode"])} for name, v in out.items()}


def batched(llm, n_prompts: int, prompt_tokens: int, max_tokens: int) -> float:
    prompts = [synthetic_prompt(llm, prompt_tokens, 1000 + i) for i in range(n_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def run_bench(llm, prompt_tokens: int, decode_tokens: int, batch: int, json_path: str | None,
              vs: str | None = None, threads: int = 2, repeats: int = 3) -> dict:
    engines = [Ours(llm)] + ([LlamaCpp(llm.model_path, threads)] if vs == "llama.cpp" else [])
    for e in engines:                                            # warm-up
        e.run(synthetic_prompt(llm, 32, 0), 4)
    figures = {"model": llm.model_name, "prompt_tokens": prompt_tokens,
               "decode_tokens": decode_tokens,
               "latency": latency(engines, llm, prompt_tokens, decode_tokens, repeats)}
    if batch:
        figures[f"batch{batch}_tok_s"] = round(batched(llm, batch, 64, decode_tokens), 2)
    print(table(figures))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def table(fig: dict) -> str:
    lat = fig["latency"]
    names = list(lat)
    rows = [f"| figure | {' | '.join(names)} |" + (" ratio |" if len(names) > 1 else ""),
            "| --- |" + " --- |" * (len(names) + (len(names) > 1))]
    for key, label, better_low in (("ttft_s", f"TTFT, {fig['prompt_tokens']}-token prompt (s)", True),
                                   ("decode_tok_s", "batch-1 decode (tok/s)", False)):
        vals = [lat[n][key] for n in names]
        row = f"| {label} | " + " | ".join(f"{v:.3g}" for v in vals) + " |"
        if len(names) > 1:   # ours relative to the peer, as the targets are written
            row += f" {vals[0] / vals[1]:.2f}x |"
        rows.append(row)
    for k, v in fig.items():
        if k.startswith("batch"):
            rows.append(f"| {k.replace('_tok_s', '')} aggregate (tok/s) | {v} |" +
                        " |" * len(names[1:]) + (" |" if len(names) > 1 else ""))
    return "\n".join(rows)
