"""Speculative decoding's gain, in process: the same requests with speculation on and off,
interleaved repeat by repeat (one engine, its speculator switched), so a noisy machine hits
both alike. Workloads:
- code edit: a 300-line Python file, asked back whole with one class renamed (batch 1, and 16
  streams each with its own file);
- free text: a story from a short prompt (batch 1), where guesses mostly fail;
- code from a short prompt (batch 1): what a draft model is for.
Optionally llama.cpp beside it, plain and with its prompt-lookup decoding, on the same tokens.
Decode speed counts the tokens after the first over the time after the first (prefill is
not speculation's business); the prompts are in the prefix cache after the first repeat, on
both sides alike."""
from __future__ import annotations

import statistics
import time

from ..params import SamplingParams

_NAMES = ["alpha", "bravo", "cargo", "delta", "ember", "fjord", "gamma", "harbor", "ion",
          "jasper", "kilo", "lumen", "mango", "nectar", "onyx", "pixel", "quartz", "raven"]


def source_file(salt: int, lines: int = 300) -> str:
    """A deterministic, plausible Python module of about `lines` lines."""
    out, i, n = [f'"""Module {salt}: records and their checks."""', "import math", ""], salt, 0
    while len(out) < lines:
        i = (i * 1103515245 + 12345) % (1 << 31)
        a, b = _NAMES[i % len(_NAMES)], _NAMES[(i >> 8) % len(_NAMES)]
        n += 1
        out += [f"class {a.title()}{b.title()}{n}:",
                f'    """Keeps the {a} of a {b} and checks it."""',
                "",
                f"    def __init__(self, {a}: float, {b}: int = {i % 97}):",
                f"        self.{a} = {a}",
                f"        self.{b} = {b}",
                "",
                f"    def {a}_total(self, values: list[float]) -> float:",
                f"        total = self.{a} * len(values)",
                "        for v in values:",
                f"            total += math.sqrt(abs(v)) + self.{b}",
                "        return total",
                "",
                f"    def check_{b}(self) -> bool:",
                f"        return self.{b} % {i % 7 + 2} == 0 and self.{a} >= 0",
                "", ""]
    return "\n".join(out[:lines]) + "\n"


def edit_prompt(llm, salt: int) -> list[int]:
    src = source_file(salt)
    first = src.split("class ", 1)[1].split(":", 1)[0]
    msg = ("Here is a Python file:\n```python\n" + src + f"```\nReturn the whole file, "
           f"unchanged except that the class `{first}` is renamed to `{first}Record`. Reply "
           f"with the code only.")
    return llm.chat_prompt_ids([{"role": "user", "content": msg}])


def story_prompt(llm, salt: int) -> list[int]:
    topics = ["a lighthouse keeper", "a lost robot", "two rival bakers", "a river that talks"]
    msg = f"Write a short story about {topics[salt % len(topics)]}."
    return llm.chat_prompt_ids([{"role": "user", "content": msg}])


def code_prompt(llm, salt: int) -> list[int]:
    tasks = ["a Python class for an LRU cache with get, put and a capacity, with docstrings",
             "a Python function that parses an INI file into nested dicts, with type hints",
             "a JavaScript function that deep-merges two objects, with comments"]
    return llm.chat_prompt_ids([{"role": "user", "content": f"Write {tasks[salt % 3]}."}])


def _decode_rate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """(aggregate decode tok/s, tokens) for prompts run together: tokens after each one's
    first, over the wall time from the first token of the batch to the last."""
    eng, params = llm.engine, SamplingParams(temperature=0.0, max_tokens=max_tokens)
    ids = [eng.add_request(p, params) for p in prompts]
    first: float | None = None
    counts = dict.fromkeys(ids, 0)
    while eng.has_unfinished():
        for d in eng.step():
            if d.token_ids and first is None:
                first = time.perf_counter()
            counts[d.seq.request_id] += len(d.token_ids)
    end = time.perf_counter()
    for rid in ids:
        eng.pop_finished(rid)
    tokens = sum(max(0, c - 1) for c in counts.values())
    return (tokens / (end - first) if first and end > first else 0.0), tokens


def _llamacpp(llm, threads: int):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    # its drafting reads every position's logits (logits_all), n_ctx x vocab floats
    kw = dict(model_path=str(llm.model_path), n_ctx=4096, n_threads=threads,
              n_threads_batch=threads, n_batch=512, verbose=False)
    return {"llama.cpp": Llama(**kw),
            "llama.cpp prompt lookup": Llama(**kw, logits_all=True,
                                             draft_model=LlamaPromptLookupDecoding(
                                                 num_pred_tokens=10))}


def _llamacpp_rate(peer, prompt: list[int], max_tokens: int) -> float:
    peer.reset()
    times = []
    for tok in peer.generate(prompt, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == max_tokens or tok == peer.token_eos():
            break
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def speculative_bench(llm, repeats: int = 3, max_tokens: int = 256, streams: int = 16,
                      vs_llamacpp: bool = False, threads: int = 2, log=print) -> dict:
    spec = llm.engine.speculator
    if spec is None:
        raise ValueError("--speculative-bench needs the engine built with --speculative")
    work = {"code edit, batch 1": [edit_prompt(llm, 1)],
            "free text, batch 1": [story_prompt(llm, 1)],
            "code from a short prompt, batch 1": [code_prompt(llm, 1)]}
    if streams > 1:
        work[f"code edit, {streams} streams"] = [edit_prompt(llm, 100 + i)
                                                 for i in range(streams)]
    peers = _llamacpp(llm, threads) if vs_llamacpp else {}
    rates: dict = {name: {"off": [], "on": [], **{p: [] for p in peers}} for name in work}
    stats0 = _counts(spec)
    for r in range(repeats + 1):                   # repeat 0 warms up and fills the cache
        for name, prompts in work.items():
            for side in ("off", "on"):
                llm.engine.speculator = spec if side == "on" else None
                rate, _ = _decode_rate(llm, prompts, max_tokens)
                if r:
                    rates[name][side].append(rate)
            if len(prompts) == 1:
                for pname, peer in peers.items():
                    rate = _llamacpp_rate(peer, prompts[0], max_tokens)
                    if r:
                        rates[name][pname].append(rate)
        llm.engine.speculator = spec
    out = {"method": spec.config.method, "draft_model": spec.config.draft_model,
           "num_speculative_tokens": spec.config.num_speculative_tokens,
           "max_tokens": max_tokens, "repeats": repeats, "rows": []}
    for name, by_side in rates.items():
        row = {"workload": name, **{f"{k}_tok_s": round(statistics.median(v), 2)
                                    for k, v in by_side.items() if v}}
        row["speedup"] = round(row["on_tok_s"] / row["off_tok_s"], 3) if row["off_tok_s"] else 0
        if "llama.cpp prompt lookup_tok_s" in row and row.get("llama.cpp_tok_s"):
            row["llamacpp_speedup"] = round(row["llama.cpp prompt lookup_tok_s"]
                                            / row["llama.cpp_tok_s"], 3)
        log(f"speculative: {name}: {row['off_tok_s']} -> {row['on_tok_s']} tok/s "
            f"(x{row['speedup']})")
        out["rows"].append(row)
    d = {k: v - stats0[k] for k, v in _counts(spec).items()}
    out["acceptance_length"] = round(1 + d["accepted"] / d["drafts"], 2) if d["drafts"] else 0
    out["draft_acceptance_rate"] = round(d["accepted"] / d["tokens"], 3) if d["tokens"] else 0
    return out


def _counts(spec) -> dict:
    st = spec.stats
    return {"drafts": st.num_drafts, "tokens": st.num_draft_tokens,
            "accepted": st.num_accepted_tokens}


def speculative_table(fig: dict) -> list[str]:
    s = fig["speculative"]
    what = s["method"] + (f" ({s['draft_model']})" if s.get("draft_model") else "")
    cols = [k for k in s["rows"][0] if k.endswith("_tok_s")]
    out = [f"## Speculative decoding: {what}, up to {s['num_speculative_tokens']} draft "
           f"tokens, greedy, {s['max_tokens']} tokens, median of {s['repeats']}", "",
           "| workload | " + " | ".join(c[:-6] + " tok/s" for c in cols) + " | on / off |",
           "| --- |" + " ---: |" * (len(cols) + 1)]
    for row in s["rows"]:
        out.append(f"| {row['workload']} | " + " | ".join(str(row.get(c, "")) for c in cols)
                   + f" | {row['speedup']:.2f}x |")
    out += ["", f"Mean acceptance length {s['acceptance_length']} tokens per verified draft; "
            f"{100 * s['draft_acceptance_rate']:.1f}% of draft tokens kept.", ""]
    return out
