"""`ostinato bench`: time to first token, batch-1 decode speed and a batched figure."""
from __future__ import annotations

import json
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


def _time_request(llm, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first token, seconds for the rest, tokens after the first)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rid = llm.engine.add_request(prompt, params)
    t0, first, n = time.perf_counter(), None, 0
    while llm.engine.has_unfinished():
        for d in llm.engine.step():
            if d.seq.request_id == rid and d.token_ids:
                n += 1
                first = first or time.perf_counter()
    llm.engine.pop_finished(rid)
    end = time.perf_counter()
    return first - t0, end - first, n - 1


def _batched(llm, n_prompts: int, prompt_tokens: int, max_tokens: int) -> float:
    prompts = [synthetic_prompt(llm, prompt_tokens, 1000 + i) for i in range(n_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def run_bench(llm, prompt_tokens: int, decode_tokens: int, batch: int, json_path: str | None):
    _time_request(llm, synthetic_prompt(llm, 32, 0), 4)              # warm-up
    ttft, _, _ = _time_request(llm, synthetic_prompt(llm, prompt_tokens, 1), 1)
    _, rest, n = _time_request(llm, synthetic_prompt(llm, 16, 2), decode_tokens + 1)
    figures = {"model": llm.model_name, "prompt_tokens": prompt_tokens,
               "ttft_s": round(ttft, 3), "prefill_tok_s": round(prompt_tokens / ttft, 1),
               "decode_tokens": n, "decode_tok_s": round(n / rest, 2)}
    if batch:
        figures[f"batch{batch}_tok_s"] = round(_batched(llm, batch, 64, decode_tokens), 2)
    print("| figure | value |\n| --- | --- |")
    for k, v in figures.items():
        print(f"| {k} | {v} |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures
