"""Accuracy of our engine against the real peers, on real GGUF models.

The fixtures `tests/fixtures/reference_<model>.json` were made by
`scripts/make_reference_fixtures.py` with llama.cpp (llama-cpp-python) and HF transformers
(fp32 on the dequantized GGUF). They hold, for a ~1,000-token text, the token ids llama.cpp
scored, its argmax and the NLL of the actual next token at every position, plus greedy
completions of six prompts.

Checked here, through the public API only:
  * teacher-forced top-1 agreement with llama.cpp, against an absolute floor and against the
    agreement HF fp32 reaches (an exact fp32 engine lands near that figure);
  * perplexity within 1.5% of llama.cpp's;
  * greedy completions: the first 12 characters match llama.cpp on at least 5 of 6 prompts;
  * our tokenizer gives llama.cpp's ids for the reference text and every prompt, and the chat
    prompts are what our chat template renders (needs no engine).
Run with `pytest -s tests/test_accuracy.py` to see the measured figures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
FIXTURES = Path(__file__).parent / "fixtures"

# name -> (conftest fixture giving the GGUF path, minimum top-1 agreement with llama.cpp)
# Gemma 3's floor is below the 0.955 first planned: HF transformers in fp32 on the same
# dequantized weights agrees with llama.cpp on only 0.939 of the positions (the misses are
# near-ties, median logit gap 0.1, where llama.cpp's 8-bit activation quantization decides),
# so an exact fp32 engine cannot reach 0.955. The HF-relative check below is the tight one.
MODELS = {
    "smollm2-135m-instruct": ("smollm_path", 0.96),
    "gemma3-270m": ("gemma_path", 0.93),
    "qwen2.5-coder-0.5b-instruct": ("qwen_path", 0.96),
}
HF_AGREEMENT_SLACK = 0.01      # ours may be at most 1 point below HF fp32's agreement
PERPLEXITY_RTOL = 0.015        # |ours / llama.cpp - 1|
PREFIX_CHARS = 12              # greedy text must start with llama.cpp's first 12 characters
MIN_PREFIX_MATCHES = 5         # ... on at least 5 of the 6 prompts


def load_reference(name: str) -> dict:
    return json.loads((FIXTURES / f"reference_{name}.json").read_text(encoding="utf-8"))


def gguf_path(request: pytest.FixtureRequest, name: str, filename: str) -> Path:
    """The model file from conftest's fixture, which skips when it is missing (fails in CI)."""
    return Path(request.getfixturevalue(MODELS[name][0]))


# ----------------------------------------------------------------------------- metrics

def top1_and_nll_from_prompt_logprobs(prompt_logprobs: list, tokens: list[int]):
    """Our argmax and NLL at positions 0..n-2, read from vLLM-style prompt_logprobs.

    prompt_logprobs[t] (t >= 1) is the distribution at position t-1 scored for the actual
    token t: a dict {token_id: Logprob} holding that token and the rank-1 (argmax) token.
    Returns (top1, nll), each of length n-1, aligned with the fixture's `top1` / `nll`.
    """
    n = len(tokens)
    assert len(prompt_logprobs) == n, f"prompt_logprobs has {len(prompt_logprobs)} entries, want {n}"
    assert prompt_logprobs[0] is None, "the first prompt token has no distribution: want None"
    top1, nll = [], []
    for t in range(1, n):
        entry = prompt_logprobs[t]
        assert tokens[t] in entry, f"position {t}: actual token {tokens[t]} missing from {entry}"
        best = [tid for tid, lp in entry.items() if lp.rank == 1]
        assert len(best) == 1, f"position {t}: want exactly one rank-1 token, got {entry}"
        logprob = entry[tokens[t]].logprob
        assert math.isfinite(logprob) and logprob <= 1e-4, f"position {t}: bad logprob {logprob}"
        top1.append(int(best[0]))
        nll.append(-float(logprob))
    return top1, nll


def agreement(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / len(a)


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def qwen_path():
    from modelfiles import model_file as _model_file
    return _model_file("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="module", params=list(MODELS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ref(name) -> dict:
    return load_reference(name)


@pytest.fixture(scope="module")
def llm(request, name, ref):
    """One engine per model for the whole module (pytest runs one model's tests, then the next)."""
    path = gguf_path(request, name, ref["gguf_file"])
    from ostinato import LLM       # imported here so the fixture checks run without the engine
    engine = LLM(str(path))
    yield engine
    del engine


@pytest.fixture(scope="module")
def teacher_forced(llm, ref):
    """(top1, nll) of our engine on the fixture's exact token ids, one prefill."""
    from ostinato import SamplingParams
    tokens = ref["tokens"]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    out = llm.generate([tokens], params)[0]
    assert list(out.prompt_token_ids) == tokens, "the engine changed the given token ids"
    return top1_and_nll_from_prompt_logprobs(out.prompt_logprobs, tokens)


# ----------------------------------------------------------------------------- tests

def test_reference_fixture_is_consistent(ref):
    """The fixture itself: aligned lengths and a perplexity that matches its NLLs."""
    n = len(ref["tokens"])
    assert n == ref["n_tokens"] and 900 <= n <= 1000
    assert len(ref["top1"]) == len(ref["nll"]) == n - 1
    assert perplexity(ref["nll"]) == pytest.approx(ref["llamacpp_perplexity"], rel=1e-4)
    assert ref["hf_top1_agreement_vs_llamacpp"] is not None, ref.get("hf_error")
    assert len(ref["completions"]) == 6


def test_top1_agreement_with_llamacpp(name, ref, teacher_forced):
    top1, _ = teacher_forced
    ours = agreement(top1, ref["top1"])
    hf = ref["hf_top1_agreement_vs_llamacpp"]
    floor = max(MODELS[name][1], hf - HF_AGREEMENT_SLACK)
    print(f"\n[{name}] top-1 agreement with llama.cpp: ours {ours:.4f}, "
          f"HF fp32 {hf:.4f}, required >= {floor:.4f}")
    assert ours >= MODELS[name][1], f"agreement {ours:.4f} below the floor {MODELS[name][1]}"
    assert ours >= hf - HF_AGREEMENT_SLACK, (
        f"agreement {ours:.4f} more than {HF_AGREEMENT_SLACK} below HF fp32's {hf:.4f}")


def test_perplexity_matches_llamacpp(name, ref, teacher_forced):
    _, nll = teacher_forced
    ours = perplexity(nll)
    theirs = ref["llamacpp_perplexity"]
    print(f"\n[{name}] perplexity: ours {ours:.4f}, llama.cpp {theirs:.4f}, "
          f"HF fp32 {ref['hf_perplexity']:.4f}, ratio {ours / theirs:.4f}")
    assert abs(ours / theirs - 1) <= PERPLEXITY_RTOL, (
        f"perplexity {ours:.4f} is more than {PERPLEXITY_RTOL:.1%} from llama.cpp's {theirs:.4f}")


def test_greedy_completions_start_like_llamacpp(name, ref, llm):
    matches, cases = _greedy_prefix_matches(name, ref, llm)
    assert matches >= MIN_PREFIX_MATCHES, (
        f"only {matches}/{len(cases)} greedy completions start like llama.cpp's")


OPTIONS = {"--prompt-bf16": {"prompt_bf16": True}, "--dtype bfloat16": {"dtype": "bfloat16"},
           "--kv-cache-dtype int8-values": {"kv_cache_dtype": "int8-values"},
           "--dtype bfloat16 --kv-cache-dtype int8-values": {"dtype": "bfloat16",
                                                             "kv_cache_dtype": "int8-values"}}


@pytest.mark.parametrize("flag", list(OPTIONS))
def test_path_options_keep_the_accuracy_bars(request, name, ref, flag):
    """--prompt-bf16 (prompt positions on AMX bfloat16 tiles), --dtype bfloat16 (every
    position, weights converted at load), --kv-cache-dtype int8-values (values as 8-bit
    codes, every position's attention reads them): the teacher-forced scores are all prompt
    positions, so they run wholly on the tiles, and so do --dtype bfloat16's greedy
    completions; the default path's bars hold."""
    from ostinato import LLM, SamplingParams
    from ostinato.kernels import ops
    if ("bf16" in flag or "bfloat16" in flag) and not ops().amx_bf16_available():
        pytest.skip(f"no AMX-BF16 on this CPU: {flag} is refused here")
    kw = OPTIONS[flag]
    engine = LLM(str(gguf_path(request, name, ref["gguf_file"])), **kw)
    tokens = ref["tokens"]
    out = engine.generate([tokens], SamplingParams(max_tokens=1, prompt_logprobs=1,
                                                   temperature=0))[0]
    top1, nll = top1_and_nll_from_prompt_logprobs(out.prompt_logprobs, tokens)
    ours, hf = agreement(top1, ref["top1"]), ref["hf_top1_agreement_vs_llamacpp"]
    ratio = perplexity(nll) / ref["llamacpp_perplexity"]
    print(f"\n[{name}] {flag}: top-1 agreement {ours:.4f} (HF fp32 {hf:.4f}), "
          f"perplexity / llama.cpp's {ratio:.4f}")
    assert ours >= MODELS[name][1] and ours >= hf - HF_AGREEMENT_SLACK, ours
    assert abs(ratio - 1) <= PERPLEXITY_RTOL, ratio
    matches, cases = _greedy_prefix_matches(name, ref, engine)
    assert matches >= MIN_PREFIX_MATCHES, f"{matches}/{len(cases)} greedy prefixes match"


def _greedy_prefix_matches(name: str, ref: dict, llm) -> tuple[int, list]:
    from ostinato import SamplingParams
    cases = ref["completions"]
    params = SamplingParams(max_tokens=32, temperature=0)
    outs = llm.generate([c["prompt_ids"] for c in cases], params)
    assert len(outs) == len(cases)
    matches = 0
    for case, out in zip(cases, outs):
        assert list(out.prompt_token_ids) == case["prompt_ids"]
        ours, theirs = out.outputs[0].text, case["text"]
        ok = ours[:PREFIX_CHARS] == theirs[:PREFIX_CHARS]
        matches += ok
        print(f"\n[{name}] {'ok  ' if ok else 'DIFF'} {case['prompt'][-30:]!r}\n"
              f"    ours:      {ours[:60]!r}\n    llama.cpp: {theirs[:60]!r}")
    print(f"[{name}] greedy prefix matches: {matches}/{len(cases)}")
    return matches, cases


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tokenizer(request, name, ref):
    from ostinato.loader.gguf import read_gguf
    from ostinato.tokenizer import Tokenizer
    path = gguf_path(request, name, ref["gguf_file"])
    return Tokenizer.from_gguf(read_gguf(path).metadata, str(path))


def test_tokenizer_matches_llamacpp_on_the_fixture_texts(ref, tokenizer):
    """llama.cpp tokenized the reference text with add_bos, no special parsing (then capped at
    1000 ids), and the prompts with add_bos and special parsing."""
    text = (FIXTURES / ref["text_file"]).read_text(encoding="utf-8")
    ours = tokenizer.encode(text, parse_special=False)
    assert len(ours) >= ref["n_tokens"] and ours[:ref["n_tokens"]] == ref["tokens"]
    for case in ref["completions"]:
        assert tokenizer.encode(case["prompt"]) == case["prompt_ids"], case["prompt"][:60]
        assert tokenizer.decode(case["generated_ids"]).startswith(case["text"].rstrip("\ufffd"))


def test_chat_prompts_are_our_template(name, ref, tokenizer):
    """The chat prompts llama.cpp completed are what apply_chat_template renders."""
    chats = [c for c in ref["completions"] if c["chat"]]
    users = [p[1] for p in _script_prompts(name) if isinstance(p, tuple)]
    assert len(chats) == len(users)
    for case, user in zip(chats, users):
        assert tokenizer.apply_chat_template([{"role": "user", "content": user}]) == case["prompt"]


def _script_prompts(name: str) -> list:
    """The prompts scripts/make_reference_fixtures.py used (its MODELS table)."""
    import importlib.util
    path = Path(__file__).parent.parent / "scripts" / "make_reference_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_reference_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODELS[name]["prompts"]
