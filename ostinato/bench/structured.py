"""Structured output's cost, in process: decode speed with a JSON schema held against the same
decode unconstrained, at 1 and 16 streams, and what compiling a typical schema adds to the
time to first token (p50 / p99). The two sides run interleaved, repeat by repeat, so a noisy
machine hits both alike."""
from __future__ import annotations

import statistics
import time

from ..params import SamplingParams
from ..engine.stats import percentile
from .latency import synthetic_prompt

# A typical schema: a few typed properties, a nested object, a bounded array, an enum.
TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z0-9]{1,20}\\.[a-z]{2,4}$"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string",
                                                         "pattern": "^[0-9]{5}$"}},
                "required": ["city"]},
    "status": {"enum": ["active", "inactive", "banned"]}}, "required": ["name", "age"]}
# For the decode figure: JSON that cannot end before max_tokens (at least 256 strings), so
# both sides decode the same number of tokens.
LONG = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 256}


def structured_bench(llm, streams=(1, 16), tokens: int = 64, repeats: int = 3,
                     compiles: int = 50, log=print) -> dict:
    out = {"decode": [], "compile": compile_times(llm, compiles)}
    c = out["compile"]
    log(f"structured: schema compile p50 {c['compile_p50_ms']} ms, p99 {c['compile_p99_ms']} ms")
    for s in streams:
        row = decode_overhead(llm, s, tokens, repeats)
        log(f"structured: {s:3d} streams: {row['free_tok_s']} tok/s free, "
            f"{row['json_tok_s']} tok/s with a schema ({row['overhead_pct']:+.1f}%)")
        out["decode"].append(row)
    out["ttft"] = ttft_added(llm, repeats=max(20, repeats))   # 20+: a p99 worth the name
    return out


def compile_times(llm, n: int) -> dict:
    """Compile the typical schema n times, each a new grammar (a distinct title, so nothing
    is served from the cache); the vocabulary is built before the clock starts."""
    grammars = llm.engine.grammars
    grammars.llg_tokenizer()
    times = []
    for i in range(n):
        spec = SamplingParams(structured_outputs={"json": {**TYPICAL, "title": f"bench {i}"}})
        t0 = time.perf_counter()
        grammars.compile(spec.structured_outputs)
        times.append(time.perf_counter() - t0)
    return {"compiles": n, "compile_p50_ms": round(1e3 * percentile(times, 50), 2),
            "compile_p99_ms": round(1e3 * percentile(times, 99), 2),
            "compile_max_ms": round(1e3 * max(times), 2)}


def decode_overhead(llm, streams: int, tokens: int, repeats: int) -> dict:
    free = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    held = SamplingParams(temperature=0, max_tokens=tokens, structured_outputs={"json": LONG})
    rates: dict[str, list[float]] = {"free": [], "json": []}
    for r in range(repeats):
        prompts = [synthetic_prompt(llm, 32, 5000 + 100 * r + i) for i in range(streams)]
        for name, p in (("free", free), ("json", held)):
            rates[name].append(_decode_rate(llm, prompts, p))
    f, j = statistics.median(rates["free"]), statistics.median(rates["json"])
    return {"streams": streams, "tokens": tokens, "free_tok_s": round(f, 1),
            "json_tok_s": round(j, 1), "overhead_pct": round(100 * (f / j - 1), 1) if j else None}


def _decode_rate(llm, prompts: list[list[int]], params: SamplingParams) -> float:
    """Aggregate tokens per second over the steps after every prompt's first token (decode
    only: prefill and the compile are outside the clock)."""
    engine = llm.engine
    rids = [engine.add_request(p, params) for p in prompts]
    try:
        while any(not s.output_ids for r in rids for s in engine.seqs[r]):
            engine.step()
        first = sum(len(s.output_ids) for r in rids for s in engine.seqs[r])
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        dt = time.perf_counter() - t0
        total = sum(len(s.output_ids) for r in rids for s in engine.seqs[r])
    finally:
        for r in rids:
            engine.abort(r)
    return (total - first) / dt if dt > 0 else 0.0


def ttft_added(llm, repeats: int) -> dict:
    """Time to first token of one 32-token prompt, unconstrained and with a fresh (uncached)
    typical schema: the compile, the first mask and the rest of the first step."""
    out: dict[str, list[float]] = {"free": [], "json": []}
    for r in range(repeats):
        for side, name in enumerate(("free", "json")):
            # a prompt of its own each time: the prefix cache must not serve either side
            prompt = synthetic_prompt(llm, 32, 7000 + 2 * r + side)
            so = {"json": {**TYPICAL, "title": f"ttft {r}"}} if name == "json" else None
            out[name].append(_ttft(llm, prompt, SamplingParams(
                temperature=0, max_tokens=1, structured_outputs=so)))
    p50 = {k: statistics.median(v) for k, v in out.items()}
    return {"free_ttft_p50_ms": round(1e3 * p50["free"], 1),
            "json_ttft_p50_ms": round(1e3 * p50["json"], 1),
            "added_p50_ms": round(1e3 * (p50["json"] - p50["free"]), 1),
            "added_p99_ms": round(1e3 * (percentile(out["json"], 99)
                                         - percentile(out["free"], 99)), 1)}


def _ttft(llm, prompt: list[int], params: SamplingParams) -> float:
    engine = llm.engine
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params)    # compiles the schema here, as a server would
    try:
        while not any(s.output_ids for s in engine.seqs[rid]):
            engine.step()
        return time.perf_counter() - t0
    finally:
        engine.abort(rid)


def structured_table(fig: dict) -> list[str]:
    st = fig["structured"]
    c, t = st["compile"], st["ttft"]
    out = ["## Structured output (a JSON schema held token by token, in process)", "",
           "| streams | tok/s free | tok/s with a schema | cost |", "| --- | --- | --- | --- |"]
    for r in st["decode"]:
        out.append(f"| {r['streams']} | {r['free_tok_s']} | {r['json_tok_s']} | "
                   f"{r['overhead_pct']:+.1f}% |")
    return out + ["", f"Typical schema compile: p50 {c['compile_p50_ms']} ms, p99 "
                  f"{c['compile_p99_ms']} ms ({c['compiles']} compiles). Time to first token "
                  f"(32-token prompt): {t['free_ttft_p50_ms']} ms free, {t['json_ttft_p50_ms']}"
                  f" ms with a fresh schema (added p50 {t['added_p50_ms']} ms, p99 "
                  f"{t['added_p99_ms']} ms).", ""]
