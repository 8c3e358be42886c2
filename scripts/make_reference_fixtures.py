"""Regenerate the accuracy fixtures `tests/fixtures/reference_<model>.json` from real peers.

For each model it records, on the fixed text `tests/fixtures/reference_text.txt`:
  * llama.cpp (llama-cpp-python), teacher-forced: the token ids it scored, its argmax token at
    every position and the NLL of the actual next token, and the perplexity;
  * HF transformers in fp32 on the dequantized GGUF, same token ids: its top-1 agreement with
    llama.cpp and its perplexity (reference figures for "how close can an fp32 engine get");
  * llama.cpp greedy completions (32 tokens) of a few prompts, with the prompt ids it used.

Only figures are stored, never full logits, so the fixtures stay small.
This is a developer tool: it needs the `peers` extra (llama-cpp-python, transformers).

    python scripts/make_reference_fixtures.py [--home DIR] [--models smollm2-135m-instruct ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

# Offline only: the HF model is built from the GGUF file itself, never from the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
TEXT_FILE = FIXTURES / "reference_text.txt"
MAX_TOKENS = 1000        # cap on the scored sequence (BOS included when llama.cpp adds one)
COMPLETION_TOKENS = 32
THREADS = 2

CHAT = "chat"            # marker: render this prompt with the model's own chat template

MODELS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "prompts": [
            "The capital of France is",
            "def fibonacci(n):\n",
            "Here is a shopping list:\n1. Milk\n2.",
            "Once upon a time, in a small village by the sea, there lived",
            "Water boils at 100 degrees Celsius at sea level. At higher altitudes,",
            (CHAT, "What are three benefits of regular exercise?"),
        ],
    },
    "gemma3-270m": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "prompts": [
            "The capital of Japan is",
            "import numpy as np\n\ndef mean_squared_error(y_true, y_pred):\n",
            "Ingredients for pancakes:\n- 2 cups flour\n-",
            "The old clockmaker opened his shop at dawn, as he had every day for forty years. "
            "That morning,",
            "In 1969, Neil Armstrong became",
            "Q: What is the largest planet in the solar system?\nA:",
        ],
    },
    "qwen2.5-coder-0.5b-instruct": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "prompts": [
            "def quicksort(arr):\n",
            "The capital of Italy is",
            "# Read a CSV file with pandas and print the first rows\nimport pandas as pd\n",
            "SELECT name, COUNT(*) FROM orders",
            "A linked list is a data structure in which",
            (CHAT, "Write a Python function that checks whether a string is a palindrome."),
        ],
    },
}


# ----------------------------------------------------------------------------- metrics

def top1_and_nll(logits: np.ndarray, tokens: list[int]) -> tuple[list[int], list[float]]:
    """Per position t < n-1: argmax of logits[t] and -log p(tokens[t+1]) (float64 log-softmax).

    logits: (n, vocab) float32, row t = distribution of the token at position t+1.
    Returns two lists of length n-1.
    """
    n = len(tokens)
    top1: list[int] = []
    nll: list[float] = []
    for t in range(n - 1):                 # row by row: a (1000, 262144) float64 copy is 2 GB
        row = logits[t].astype(np.float64)
        top1.append(int(np.argmax(row)))
        m = row.max()
        log_z = m + math.log(np.exp(row - m).sum())
        nll.append(float(log_z - row[tokens[t + 1]]))
    return top1, nll


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def agreement(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / len(a)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- llama.cpp

def open_llama(path: Path):
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS,
                 n_batch=512, logits_all=True, verbose=False)


def llamacpp_teacher_forced(llm, text: str) -> tuple[list[int], np.ndarray]:
    """Tokenize like llama.cpp does (its own BOS decision), cap, evaluate; (tokens, logits)."""
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:MAX_TOKENS]
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)   # (n, vocab)
    return tokens, logits


def render_chat(llm, user_message: str) -> str:
    """The model's own GGUF chat template, one user turn, generation prompt appended."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise SystemExit("a chat prompt was requested for a model without a chat template")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True)


def greedy_completion(llm, prompt_ids: list[int]) -> tuple[list[int], str]:
    """Argmax decoding for COMPLETION_TOKENS steps, stopping at an end-of-generation token.

    The text is the detokenized (prompt + completion) minus the detokenized prompt, so a
    leading space that belongs to the first generated token is kept.
    """
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt_ids)
    generated: list[int] = []
    for _ in range(COMPLETION_TOKENS):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        generated.append(tok)
        llm.eval([tok])
    full = llm.detokenize(prompt_ids + generated)
    head = llm.detokenize(prompt_ids)
    tail = full[len(head):] if full.startswith(head) else llm.detokenize(generated)
    return generated, tail.decode("utf-8", errors="replace")


def llamacpp_completions(llm, prompts: list) -> list[dict]:
    out = []
    for p in prompts:
        is_chat = isinstance(p, tuple)
        prompt = render_chat(llm, p[1]) if is_chat else p
        # special=True: the chat markers (<|im_start|> ...) must become their control tokens.
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        gen, text = greedy_completion(llm, ids)
        out.append({"prompt": prompt, "chat": is_chat, "prompt_ids": ids,
                    "generated_ids": gen, "text": text})
        print(f"    {prompt[-40:]!r} -> {text!r}")
    return out


# ----------------------------------------------------------------------------- transformers

def hf_logits(model_path: Path, tokens: list[int]) -> np.ndarray:
    """fp32 logits (n, vocab) of HF transformers on the dequantized GGUF, one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens], dtype=torch.long))
    return out.logits[0].float().numpy()


def hf_figures(model_path: Path, tokens: list[int], ref_top1: list[int]) -> dict:
    try:
        logits = hf_logits(model_path, tokens)
    except Exception as err:        # recorded in the fixture, never faked
        return {"hf_top1_agreement_vs_llamacpp": None, "hf_perplexity": None,
                "hf_error": f"{type(err).__name__}: {err}"}
    top1, nll = top1_and_nll(logits, tokens)
    return {"hf_top1_agreement_vs_llamacpp": round(agreement(top1, ref_top1), 5),
            "hf_perplexity": round(perplexity(nll), 5)}


# ----------------------------------------------------------------------------- driver

def peer_versions() -> str:
    import llama_cpp
    import torch
    import transformers
    return (f"llama-cpp-python {llama_cpp.__version__} (n_ctx=4096, n_batch=512, "
            f"{THREADS} threads, CPU); transformers {transformers.__version__} fp32 on the "
            f"dequantized GGUF, torch {torch.__version__}; "
            f"scripts/make_reference_fixtures.py")


def build_fixture(name: str, home: Path, text: str) -> dict:
    spec = MODELS[name]
    path = home / spec["file"]
    if not path.is_file():
        raise SystemExit(f"{name}: model file not found: {path}")
    print(f"[{name}] llama.cpp teacher-forced on {path.name}")
    t0 = time.time()
    llm = open_llama(path)
    tokens, logits = llamacpp_teacher_forced(llm, text)
    top1, nll = top1_and_nll(logits, tokens)
    del logits
    ppl = perplexity(nll)
    print(f"    {len(tokens)} tokens (first {tokens[:3]}), perplexity {ppl:.4f}, "
          f"{time.time() - t0:.1f}s")
    print(f"[{name}] llama.cpp greedy completions")
    completions = llamacpp_completions(llm, spec["prompts"])
    del llm
    print(f"[{name}] transformers fp32")
    t0 = time.time()
    hf = hf_figures(path, tokens, top1)
    print(f"    {hf}, {time.time() - t0:.1f}s")
    return {
        "model": name,
        "gguf_file": spec["file"],
        "gguf_sha256": sha256_of(path),
        "text_file": TEXT_FILE.name,
        "n_tokens": len(tokens),
        "tokens": tokens,
        "top1": top1,                              # top1[t] = llama.cpp argmax predicting t+1
        "nll": [round(x, 5) for x in nll],        # nll[t] = -log p(tokens[t+1])
        "llamacpp_perplexity": round(ppl, 5),
        **hf,
        "completions": completions,
        "generated_by": peer_versions(),
    }


def to_json(fixture: dict) -> str:
    """One top-level key per line, long lists kept on one line, one completion per line."""
    def dump(v) -> str:
        return json.dumps(v, ensure_ascii=False)
    lines = []
    for key, value in fixture.items():
        if key == "completions":
            items = ",\n  ".join(dump(c) for c in value)
            lines.append(f" {dump(key)}: [\n  {items}\n ]")
        else:
            lines.append(f" {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_home = os.environ.get("OSTINATO_HOME", str(Path.home() / ".cache" / "ostinato"))
    ap.add_argument("--home", type=Path, default=Path(default_home),
                    help="directory holding the GGUF files (default $OSTINATO_HOME or "
                         "~/.cache/ostinato)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = ap.parse_args(argv)
    text = TEXT_FILE.read_text(encoding="utf-8")
    for name in args.models:
        fixture = build_fixture(name, args.home.expanduser(), text)
        out = FIXTURES / f"reference_{name}.json"
        out.write_text(to_json(fixture), encoding="utf-8")
        print(f"[{name}] wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
