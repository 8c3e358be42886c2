"""Tokenizer vs llama.cpp: ids from tests/fixtures/tokenizer_*.json (written by
scripts/make_tokenizer_fixtures.py from llama-cpp-python), decode, streaming, chat templates."""
from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

import jinja2
import pytest
from jinja2.exceptions import SecurityError

from ostinato.loader.gguf import read_gguf
from ostinato.tokenizer import (
    NORMAL,
    SPACE_MARK,
    UNKNOWN,
    IncrementalDetokenizer,
    Tokenizer,
    render_chat_template,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"tokenizer_{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm_md(smollm_path):
    return read_gguf(smollm_path).metadata


@pytest.fixture(scope="module")
def gemma_md(gemma_path):
    return read_gguf(gemma_path).metadata


@pytest.fixture(scope="module")
def smollm(smollm_md, smollm_path):
    return Tokenizer.from_gguf(smollm_md, str(smollm_path))


@pytest.fixture(scope="module")
def gemma(gemma_md, gemma_path):
    return Tokenizer.from_gguf(gemma_md, str(gemma_path))


QWEN = "qwen2.5-coder-0.5b-instruct"
# fixture name -> (tokenizer fixture, metadata fixture)
MODELS = {"smollm2-135m-instruct": ("smollm", "smollm_md"), "gemma3-270m": ("gemma", "gemma_md"),
          QWEN: ("qwen", "qwen_md")}


@pytest.fixture(scope="module")
def qwen_md():
    from modelfiles import model_file as _model_file
    return read_gguf(_model_file(QWEN)).metadata


@pytest.fixture(scope="module")
def qwen(qwen_md):
    return Tokenizer.from_gguf(qwen_md, QWEN)


@pytest.fixture(params=list(MODELS))
def model(request):
    """(tokenizer, fixture data) for each model."""
    tok = request.getfixturevalue(MODELS[request.param][0])
    return tok, _fixture(request.param)


def _texts(fx: dict) -> list[str]:
    return [c["text"] for c in fx["cases"] if not c["add_bos"]]


# ------------------------------------------------------------------ ids match llama.cpp
def test_fixture_is_substantial(model):
    _, fx = model
    assert len(_texts(fx)) >= 45 and any(c["add_bos"] for c in fx["cases"])


def test_encode_matches_llama_cpp(model):
    tok, fx = model
    wrong = [(c["text"][:40], c["add_bos"]) for c in fx["cases"]
             if tok.encode(c["text"], add_special_tokens=c["add_bos"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} of {len(fx['cases'])} cases differ from llama.cpp: {wrong}"


def test_fewest_tokens_never_exceeds_the_tokens_a_text_takes(model):
    """The server refuses a text longer than its context before tokenizing it on this bound
    (serving.check_text_length): it must never say more tokens than encode() gives, for
    the fixtures' texts and for runs of what the longest tokens are made of."""
    tok, fx = model
    chars = (" ", "\n", "\t", "#", "-", "=", "a", "é", "中", "😀", "\U00050000") + \
        tuple(map(chr, range(32)))          # control bytes: SmolLM2 has no token for six
    runs = [c * n for c in chars for n in (1, 7, 31, 32, 33, 80, 81, 82, 128, 129, 600)]
    runs += ["a\x04" * 300, "\x04" * 500 + "b"]
    rng = random.Random(17)
    words = ["".join(rng.choice(alphabet) for _ in range(n)) for n in (1, 5, 300, 5000)
             for alphabet in (string.ascii_lowercase, string.ascii_letters, string.digits,
                              "ab", "tehion")]
    words += ["Supercalifragilistic" * 300, " ".join(words), "x" * 40_000 + "1" * 40_000,
              "zzzzz" + "abcdefgh" * 8192, " " * 70_000]     # tokens across 32 KB cuts
    for text in _texts(fx) + runs + words + ["".join(_texts(fx))]:
        assert tok.fewest_tokens(text) <= len(tok.encode(text, add_special_tokens=False)), \
            text[:40]
    assert tok.fewest_tokens("x" * 100_000) > 100_000 // 200     # and it says something
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(40_000))
    assert tok.fewest_tokens(word) > 0.7 * len(tok.encode(word))     # a random word: close
    assert 100 < tok.fewest_tokens(word, cap=100) <= tok.fewest_tokens(word)   # stops past cap


@pytest.mark.parametrize("name", list(MODELS))
def test_variant_settings_match_llama_cpp(name, request):
    """Other pre-tokenizers (gpt-2, default, llama-bpe) on SmolLM's vocab; those of the other
    families (qwen35, gpt-4o, tekken, dbrx, falcon, deepseek-llm/-coder) on Qwen's and on the
    Llama 3 vocab of llama.cpp's test GGUFs (a variant's "vocab", from the sdist);
    SentencePiece with add_space_prefix on Gemma's: metadata overridden in memory as the
    script did."""
    fx = _fixture(name)
    assert fx["variants"]
    for variant in fx["variants"]:
        md = _variant_base(variant, request)
        other = Tokenizer.from_gguf({**md, **variant["override"]})
        wrong = [c["text"][:40] for c in variant["cases"] if other.encode(c["text"]) != c["ids"]]
        where = f"{variant.get('vocab', name)} {variant['override']}"
        assert not wrong, f"{where}: {len(wrong)} of {len(variant['cases'])} differ: {wrong}"


_SDIST_VOCABS: dict[str, dict] = {}


def _variant_base(variant: dict, request) -> dict:
    """The metadata a variant overrides: the model's own, or an sdist vocab GGUF's."""
    if "vocab" not in variant:
        return request.getfixturevalue(MODELS[request.node.callspec.params["name"]][1])
    if variant["vocab"] not in _SDIST_VOCABS:
        from test_tokenizer_vectors import llama_cpp_models_dir
        path = llama_cpp_models_dir() / variant["vocab"]
        _SDIST_VOCABS[variant["vocab"]] = read_gguf(path).metadata
    return _SDIST_VOCABS[variant["vocab"]]


def test_qwen_variants_tell_the_pre_tokenizers_apart():
    """On the Llama 3 vocab, llama.cpp's ids differ between every pair of these
    pre-tokenizers, so each variant checks its own regex (qwen2/qwen35 and gpt-4o/dbrx differ
    on one text each: combining marks, a case change)."""
    by_pre = {v["override"]["tokenizer.ggml.pre"]: [c["ids"] for c in v["cases"]]
              for v in _fixture(QWEN)["variants"] if v.get("vocab")}
    assert len(by_pre) == 8
    names = sorted(by_pre)
    same = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if by_pre[a] == by_pre[b]]
    assert not same, same


def test_pre_tokenizers_really_differ(smollm, smollm_md):
    """The variant fixtures can tell the regexes apart (digits, whitespace runs)."""
    gpt2 = Tokenizer.from_gguf({**smollm_md, "tokenizer.ggml.pre": "gpt-2"})
    assert smollm.encode("a   1") != gpt2.encode("a   1")


def test_special_tokens_are_single_ids(smollm, gemma):
    im_start, im_end = smollm.token_id("<|im_start|>"), smollm.token_id("<|im_end|>")
    assert smollm.encode("<|im_start|>user\nHi<|im_end|>")[0] == im_start
    assert smollm.encode("<|im_start|>user\nHi<|im_end|>")[-1] == im_end
    assert im_start not in smollm.encode("<|im_star|>")
    sot = gemma.token_id("<start_of_turn>")
    assert gemma.encode("<start_of_turn>model", add_special_tokens=False)[0] == sot


def test_bos_eos_flags(smollm, gemma):
    assert smollm.encode("Hi") == smollm.encode("Hi", add_special_tokens=False)  # add_bos False
    assert gemma.encode("Hi")[0] == gemma.bos_token_id == 2
    assert gemma.encode("Hi", add_special_tokens=False)[0] != 2
    assert gemma.encode("") == [2] and gemma.encode("", add_special_tokens=False) == []


def test_token_properties(smollm, gemma):
    assert smollm.vocab_size == 49152 and gemma.vocab_size == 262144
    assert smollm.eos_token_id == 2 and {0, 2} <= smollm.eos_token_ids
    assert gemma.eos_token_id == 1 and {1, gemma.token_id("<end_of_turn>")} <= gemma.eos_token_ids
    assert smollm.is_special(1) and not smollm.is_special(smollm.encode("hello")[0])
    assert gemma.token_to_bytes(gemma.token_id("<0x0A>")) == b"\n"
    assert gemma.token_to_bytes(gemma.token_id("\u2581")) == b" "
    assert smollm.id_to_piece(smollm.token_id("\u0120the")) == "\u0120the"
    assert smollm.token_to_bytes(smollm.token_id("\u0120the")) == b" the"
    assert smollm.token_to_bytes(1) == b"<|im_start|>"
    assert smollm.token_to_bytes(1, special=False) == b""
    with pytest.raises(ValueError, match="out of range"):
        smollm.decode([smollm.vocab_size])


def test_unsupported_tokenizers_raise(smollm_md):
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf({**smollm_md, "tokenizer.ggml.model": "bert"}, "x.gguf")
    with pytest.raises(ValueError, match="'no-such-pre'"):
        Tokenizer.from_gguf({**smollm_md, "tokenizer.ggml.pre": "no-such-pre"})


def test_a_nan_token_score_is_refused_at_load(gemma_md):
    """SentencePiece merges by score: a NaN would make the ids depend on heap order."""
    scores = list(gemma_md["tokenizer.ggml.scores"])
    scores[300] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[300\] is NaN"):
        Tokenizer.from_gguf({**gemma_md, "tokenizer.ggml.scores": scores}, "x.gguf")
    scores[300] = float("-inf")                  # ordered: still a score
    assert Tokenizer.from_gguf({**gemma_md, "tokenizer.ggml.scores": scores}).encode("hello")


def test_byte_level_bpe_ignores_its_scores(smollm_md):
    """Scores order SentencePiece merges only: a gpt2 vocabulary's NaN scores are never read."""
    n = len(smollm_md["tokenizer.ggml.tokens"])
    tok = Tokenizer.from_gguf({**smollm_md, "tokenizer.ggml.scores": [float("nan")] * n})
    assert tok.encode("hello world") == Tokenizer.from_gguf(smollm_md).encode("hello world")


def test_encode_is_fast(model):
    """A ~1,000+ token text, fresh word cache, well under a second even on a busy CPU."""
    tok, fx = model
    text = "\n".join(t for t in _texts(fx) if len(t) < 100) * 2
    (tok._word_cache if tok.model == "gpt2" else tok._spm_cache).clear()   # the cold path
    t0 = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - t0
    assert len(ids) > 1000
    assert elapsed < 0.5, f"{len(ids)} tokens took {elapsed:.3f}s"


def test_sentencepiece_merges_word_by_word_as_over_the_whole_text(gemma):
    """A merge joins two symbols into a token, so a text cut before a space mark that follows
    another character merges to the same ids word by word (and a word seen before is looked
    up), unless a token with an inner space mark could span the cut: Gemma 3 has one,
    '>▁</'. Random texts of space marks, runs of them, other scripts and that token."""
    assert gemma._spm_bridges == [">▁</"]
    rng = random.Random(3)
    alphabet = list("ab cdé  \n\t.,<>/}{") + ["▁", "日本", "🙂", ">▁</", "\u00a0", "ing"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        text = text.replace(" ", SPACE_MARK)
        whole: list[int] = []
        gemma._merge_spm(text, whole)
        words: list[int] = []
        gemma._encode_spm(text, words)
        assert words == whole, text
    assert gemma._spm_cache                                 # the word path was taken


def test_a_token_across_words_makes_the_whole_text_merge():
    """A vocabulary whose 'a▁b' spans the cut before '▁': merged word by word 'a▁b' would be
    three tokens; the text holds a bridging token, so it merges whole, as llama.cpp does."""
    tokens = ["<unk>", "a", "b", SPACE_MARK, f"a{SPACE_MARK}", f"a{SPACE_MARK}b"]
    tok = Tokenizer(model="llama", tokens=tokens, token_types=[UNKNOWN] + [NORMAL] * 5,
                    scores=[0.0, 0.0, 0.0, 0.0, -1.0, -2.0], merges=None, pre="default",
                    bos_token_id=None, eos_token_id=None, unknown_token_id=0, add_bos=False,
                    add_eos=False, add_space_prefix=False)
    assert tok._spm_bridges == [f"a{SPACE_MARK}", f"a{SPACE_MARK}b"]
    assert tok.encode("a b") == [5]
    assert tok.encode("b b") == [2, 3, 2]


# ------------------------------------------------------------------ decode
def test_decode_round_trips(model):
    tok, fx = model
    wrong = [t for t in _texts(fx) if tok.decode(tok.encode(t, add_special_tokens=False)) != t]
    assert not wrong


def test_decode_matches_llama_cpp_detokenize(model):
    tok, fx = model
    assert fx["detok"]
    for d in fx["detok"]:
        assert tok.decode(d["ids"], skip_special_tokens=not d["special"]) == d["text"], d


def test_skip_special_tokens(smollm):
    ids = smollm.encode("<|im_start|>user\nHi<|im_end|>")
    assert smollm.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert smollm.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_space_prefix_rule(gemma_md):
    """SentencePiece add_space_prefix: encode adds '▁' before the text, decode drops it
    from the first text token (BOS before it does not count)."""
    tok = Tokenizer.from_gguf({**gemma_md, "tokenizer.ggml.add_space_prefix": True})
    ids = tok.encode("Hello world")
    assert tok.id_to_piece(ids[1]).startswith("\u2581")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.decode(ids[1:]) == "Hello world"


# ------------------------------------------------------------------ streaming
STREAM_TEXTS = ["Emoji: 😀🎉👍🏽 done", "Family 👨‍👩‍👧‍👦 and flag 🏳️‍🌈 🇫🇷",
                "中文测试：你好，世界！日本語のテキスト", "नमस्ते दुनिया, 한국어 문장입니다.",
                "rare: 𓀀 𐌰 𪚥 🪿 ꙮ ᚠ 𝔘 end"]


def _stream(tok, ids, prompt_ids=None, skip=False) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer(model, text):
    tok, _ = model
    ids = tok.encode(text, add_special_tokens=False)
    chunks = _stream(tok, ids)
    assert not any("\ufffd" in c for c in chunks), chunks
    assert "".join(chunks) == tok.decode(ids) == text


def test_stream_texts_cut_characters(model):
    """The streaming texts really split UTF-8 characters across tokens on both models,
    so the hold-back is exercised."""
    tok, _ = model
    ids = [i for t in STREAM_TEXTS for i in tok.encode(t, add_special_tokens=False)]
    cut = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert len(cut) >= 2


def test_incremental_detokenizer_with_prompt_and_specials(smollm):
    prompt = smollm.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    gen = smollm.encode("Salut 👋 ça va ?<|im_end|>")
    assert "".join(_stream(smollm, gen, prompt)) == smollm.decode(gen)
    assert "".join(_stream(smollm, gen, prompt, skip=True)) == "Salut 👋 ça va ?"


def test_incremental_detokenizer_space_prefix(gemma_md):
    tok = Tokenizer.from_gguf({**gemma_md, "tokenizer.ggml.add_space_prefix": True})
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "Hello world"
    prompt = tok.encode("Say:")   # generated text after a prompt keeps its leading space
    whole = tok.decode(prompt + ids)
    assert "".join(_stream(tok, ids, prompt)) == whole[len(tok.decode(prompt)):] == " Hello world"


def test_incremental_detokenizer_flushes_cut_character(smollm):
    ids = smollm.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(smollm)
    assert detok.add(ids[0]) == ""
    assert detok.flush() == "\ufffd"


# ------------------------------------------------------------------ chat templates
MESSAGES = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]


def test_smollm_chat_template(smollm):
    assert smollm.chat_template and "<|im_start|>" in smollm.chat_template
    ours = smollm.apply_chat_template(MESSAGES)
    plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        smollm.chat_template).render(messages=MESSAGES, add_generation_prompt=True,
                                     bos_token=smollm.bos_token, eos_token=smollm.eos_token)
    assert ours == plain
    assert ours.startswith("<|im_start|>system\n")   # default system prompt when none given
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n" in ours
    assert ours.endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert not smollm.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith(
        "assistant\n")
    ids = smollm.encode(ours)
    assert ids.count(smollm.token_id("<|im_start|>")) == 5


def test_gemma_fallback_transcript(gemma):
    assert gemma.chat_template is None
    msgs = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    assert gemma.apply_chat_template(msgs) == (
        "System: Be brief.\nUser: What is 2+2?\nAssistant: 4\nUser: And 3+3?\nAssistant:")
    assert gemma.apply_chat_template(msgs[:2], add_generation_prompt=False) == (
        "System: Be brief.\nUser: What is 2+2?")


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "admin", "content": "x"}],
                                 [{"role": "user", "content": 3}], [{"content": "x"}], ["x"]])
def test_chat_messages_validated(smollm, gemma, bad):
    for tok in (smollm, gemma):
        with pytest.raises(ValueError):
            tok.apply_chat_template(bad)


def test_chat_content_parts(gemma):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    msgs = [{"role": "user", "content": parts}]
    assert gemma.apply_chat_template(msgs) == "User: ab\nAssistant:"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% include '/etc/passwd' %}",
    "{% import '/etc/passwd' as p %}",
    "{% set l = [] %}{% for i in range(99999) %}{% set _ = l.append(i) %}{% endfor %}"
    "{% for x in l %}{% set _ = l.append(x) %}{% endfor %}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% for i in range(99999) %}{{ 'x' * 100 }}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ ((10**60)**60)**60 }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% set s = 'x' * 99999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% for a in messages %}{% for b in 'x' * 99999 %}{% for c in 'y' * 99999 %}"
    "{% endfor %}{% endfor %}{% endfor %}",
])
def test_sandbox_blocks_hostile_templates(template):
    t0 = time.perf_counter()
    with pytest.raises(SecurityError):
        render_chat_template(template, messages=[{"role": "user", "content": "x"}])
    assert time.perf_counter() - t0 < 5


def test_templates_never_change_the_callers_objects():
    """list.append/pop work (Kimi K2's templates queue tool call ids) on copies only."""
    msgs = [{"role": "user", "content": "x", "tool_calls": [{"id": "a"}]}]
    out = render_chat_template("{% set _ = messages.append(1) %}{% set _ = messages[0]"
                               ".tool_calls.pop() %}{{ messages | length }}", messages=msgs)
    assert out == "2" and msgs == [{"role": "user", "content": "x", "tool_calls": [{"id": "a"}]}]
    with pytest.raises(SecurityError):
        render_chat_template("{% set _ = messages.clear() %}", messages=msgs)


def test_sandbox_helpers():
    assert render_chat_template("{{ bos_token }}{{ strftime_now('%Y') | length }}",
                                bos_token="<s>") == "<s>4"
    with pytest.raises(ValueError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}")
    assert render_chat_template("{% for i in range(3) %}{{ i }}{% endfor %}") == "012"


def test_a_tool_call_history_renders(smollm_path):
    """An assistant turn that is only tool_calls (OpenAI's content null) renders as an empty
    assistant text in a template that does not write calls (the server writes them itself
    for such templates: ostinato.structured.tools.template_messages)."""
    tok = Tokenizer.from_gguf(read_gguf(smollm_path).metadata)
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = tok.apply_chat_template(msgs)
    assert "<|im_start|>assistant\n<|im_end|>" in text and "sunny" in text


def test_the_run_bound_holds_across_its_chunk_cuts():
    """A run whose only long piece straddles every 32 KB cut: the fewest pieces that tile
    it are 5 + 8,192; reading the chunks apart (one taken off per cut) said 8,209."""
    import numpy as np
    from ostinato.tokenizer import _run_tokens, _window_hasher

    def hashes(parts: list[bytes]) -> np.ndarray:
        n = len(parts[0])
        return np.sort(_window_hasher(b"".join(parts))(n)[::n])
    pieces = {1: hashes([bytes([c]) for c in b"abcdefghz"]), 8: hashes([b"abcdefgh"])}
    run = b"zzzzz" + b"abcdefgh" * 8192
    assert _run_tokens(run, pieces, None) == 5 + 8192
    assert _run_tokens(run, pieces, 100) == 101                   # stops past the cap
