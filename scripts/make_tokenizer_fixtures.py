"""Write the tokenizer test fixtures from llama.cpp (through llama-cpp-python).

    .venv/bin/python scripts/make_tokenizer_fixtures.py [--home DIR]

For each model file in DIR (default $OSTINATO_HOME or ~/.cache/ostinato) this loads the
vocabulary only (`llama_cpp.Llama(path, vocab_only=True)`), tokenizes every string in TEXTS
with `llm.tokenize(text.encode(), add_bos=..., special=True)` and detokenizes a few id lists
with `llm.detokenize(ids, special=...)`, and writes tests/fixtures/tokenizer_<name>.json:

    {"model": file name, "cases": [{"text", "add_bos", "ids"}],
     "detok": [{"ids", "special", "text"}],
     "variants": [{"override": {metadata key: value}, "cases": [{"text", "ids"}]}]}

`variants` cover tokenizer settings these files lack: the other byte-level BPE
pre-tokenizers ("gpt-2", "default", "llama-bpe") with SmolLM's vocabulary and merges, those of
the other families (qwen35, gpt-4o, tekken, dbrx, falcon, deepseek-llm/-coder) with Qwen's and
with the Llama 3 vocabulary of llama.cpp's test GGUFs (the variant names its "vocab"), and
SentencePiece with add_space_prefix=True on Gemma's vocabulary. For each, a vocab-only GGUF
copy of the model's metadata with the override applied is written to a temp dir (never
kept) and tokenized by llama.cpp (add_bos=True, special=True). The tests rebuild that
metadata in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
VARIANTS = {
    "smollm2-135m-instruct": [{"tokenizer.ggml.pre": p} for p in ("gpt-2", "default", "llama-bpe")],
    "gemma3-270m": [{"tokenizer.ggml.add_space_prefix": True}],
    # the pre-tokenizers of the other families, on Qwen's 151k vocabulary and merges
    "qwen2.5-coder-0.5b-instruct": [{"tokenizer.ggml.pre": p} for p in (
        "qwen35", "gpt-4o", "tekken", "dbrx", "falcon", "deepseek-llm", "deepseek-coder")],
}

# Strings written for these tests: scripts, emoji, code, whitespace and special-token texts.
TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple     spaces   between words",
    "tab\tseparated\tvalues",
    "line one\nline two\n\nline four",
    "windows\r\nline endings\r\n",
    "\n\n\n",
    "\t\t  \n  \t",
    "a" * 300,
    " " * 200,
    "\n" * 40,
    "ab " * 50,
    "1234567890",
    "a   1",
    "x  2024  y",
    "a  \n1",
    "3.14159265358979 and 2,718,281",
    "Phone: +1 (555) 010-9999, year 2024",
    "I'm sure you're right, they'll say it's what we'd've done",
    "DON'T SHOUT, It'S fine; I'Ll go",
    "MiXeD CaSe WoRdS and camelCaseIdentifiers",
    "https://example.com/path/to?query=1&lang=en#frag",
    "user.name+tag@example.org",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "if x == 1 and y != 2:\n\tprint(f\"{x=}\")",
    "<html><body class=\"main\">Hi &amp; bye</body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"ok\": true}}",
    "SELECT * FROM users WHERE id = 42;",
    "naïve café résumé façade über Straße",
    "Ελληνικά κείμενο και αριθμοί 123",
    "Русский текст: привет, мир!",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "中文测试：你好，世界！",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "ไทย ภาษา",
    "Emoji: 😀🎉👍🏽",
    "Family 👨‍👩‍👧‍👦 and flag 🏳️‍🌈 and 🇫🇷",
    "math ∑ ∫ √ ≠ ≤ ≥ ∞ π",
    "zero\u200bwidth and nbsp\u00a0here and ideographic\u3000space",
    "curly “quotes” and ‘single’ and em—dash…",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "text<|endoftext|>more text",
    "<bos>literal bos<eos>",
    "<|im_start|><|im_end|><|im_start|>",
    "not special: <|im_star|> and <start_of_turn",
    "<0x41> looks like a byte token",
    "tokens 'in' \"quotes\" (parens) [brackets] {braces}",
    "   \n",
    "mixed\u00e9\u0301 combining accents",
    "Ünïcödé ÄÖÜ äöü ß",
    "rare scripts (byte fallback): 𓀀 𐌰 𪚥 🪿 ꙮ ᚠ 𝔘",
]
# The same pre-tokenizers on Llama 3's 128k vocabulary (llama.cpp's vocab-only test GGUF from
# the llama-cpp-python sdist), whose merges cross more of the splits these regexes differ in
# (digit runs, case changes) than Qwen's do: model -> (sdist vocab file, overrides).
SDIST_VARIANTS = {"qwen2.5-coder-0.5b-instruct": ("ggml-vocab-llama-bpe.gguf", [
    {"tokenizer.ggml.pre": p} for p in (
        "qwen2", "qwen35", "gpt-4o", "tekken", "dbrx", "falcon", "deepseek-llm",
        "deepseek-coder")])}
SDIST_MODELS = Path("sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models")

# more texts for the models added later (the older fixtures keep TEXTS): case changes inside
# words (gpt-4o / tekken split there), non-ASCII capitals, combining marks, digit runs, CJK
EXTRA_TEXTS = {"qwen2.5-coder-0.5b-instruct": [
    "HTTPServer XMLHttpRequest getHTTPResponseCode iOS macOS",
    "\u00c9coleNormale get\u00dcberWert na\u00efveCaf\u00e9 \u00c5ngstr\u00f6m",
    "\u03a9mega \u0391\u0392\u0393\u03b1\u03b2\u03b3 \u0416\u0436\u0416\u0436",
    "e\u0301cole \u0915\u093f\u0924\u093e\u092c \u0e01\u0e34\u0e19",
    "123456789 1,234,567.89 0x1F 3e-10",
    "I'M HERE, YOU'RE THERE. We'LL see; THEY'D agree",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u6df7\u5408English\u548c\u4e2d\u6587 "
    "\ud55c\uad6d\uc5b4 \u30ab\u30bf\u30ab\u30ca",
    "path/to/file.py:42 a/b//c ///",
    "   indented\n\tcode\r\n  \n",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "<|fim_prefix|>def f(x):<|fim_suffix|>    return x<|fim_middle|>",
]}
# texts also tokenized with add_bos=True (llama.cpp's add_special)
BOS_TEXTS = ["", "Hello world", "<|im_start|>user\nHi<|im_end|>", "<bos>literal bos<eos>"]
# texts whose ids are detokenized by llama.cpp, with special tokens rendered or hidden
DETOK_TEXTS = [
    ("Hello, world! How are you today?", False),
    ("naïve café résumé façade über Straße", False),
    ("Family 👨‍👩‍👧‍👦 and flag 🏳️‍🌈 and 🇫🇷", False),
    ("中文测试：你好，世界！", False),
    ("<|im_start|>user\nHi there<|im_end|>\n", True),
    ("<|im_start|>user\nHi there<|im_end|>\n", False),
    ("<start_of_turn>user\nHello<end_of_turn>\n", True),
    ("<start_of_turn>user\nHello<end_of_turn>\n", False),
    ("  two leading spaces", False),
    ("line one\nline two\n\nline four", False),
]


def _tokenize(llm, text: str, add_bos: bool) -> list[int]:
    return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)]


def _detok_cases(llm) -> list[dict]:
    cases = []
    for text, special in DETOK_TEXTS:
        ids = _tokenize(llm, text, add_bos=False)
        # llama-cpp-python copies each piece through a 32-byte buffer: skip longer pieces
        if any(len(llm._model.token_to_piece(t, special=True).rstrip(b"\0")) >= 32 for t in ids):
            continue
        raw = llm.detokenize(ids, special=special)
        cases.append({"ids": ids, "special": special, "text": raw.decode("utf-8")})
    return cases


def _vocab_only_copy(src: Path, dst: Path, override: dict) -> None:
    """Write src's metadata, with the override's keys replaced, and no tensors, to dst."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = override[key] if key in override else field.contents()
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _variants(llama_cls, path: Path, overrides: list[dict], texts: list[str],
              extra: dict | None = None) -> list[dict]:
    extra = extra or {}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, override in enumerate(overrides):
            copy = Path(tmp) / f"vocab-{k}.gguf"
            _vocab_only_copy(path, copy, override)
            llm = llama_cls(str(copy), vocab_only=True, verbose=False)
            cases = [{"text": t, "ids": _tokenize(llm, t, add_bos=True)} for t in texts]
            out.append({"override": override, "cases": cases, **extra})
            del llm
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=os.environ.get("OSTINATO_HOME",
                                                     os.path.expanduser("~/.cache/ostinato")))
    ap.add_argument("--model", action="append", choices=sorted(MODELS),
                    help="only this model's fixture (repeatable; default: all)")
    args = ap.parse_args()
    from llama_cpp import Llama

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, fname in MODELS.items():
        if args.model and name not in args.model:
            continue
        path = Path(args.home) / fname
        texts = TEXTS + EXTRA_TEXTS.get(name, [])
        if not path.is_file():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        llm = Llama(str(path), vocab_only=True, verbose=False)
        cases = [{"text": t, "add_bos": False, "ids": _tokenize(llm, t, False)} for t in texts]
        cases += [{"text": t, "add_bos": True, "ids": _tokenize(llm, t, True)} for t in BOS_TEXTS]
        data = {"model": fname, "cases": cases, "detok": _detok_cases(llm)}
        del llm
        data["variants"] = _variants(Llama, path, VARIANTS[name], texts)
        if name in SDIST_VARIANTS:
            vocab, overrides = SDIST_VARIANTS[name]
            vpath = Path(args.home) / SDIST_MODELS / vocab
            if not vpath.is_file():
                raise SystemExit(f"{vpath} is missing: `pytest tests/test_tokenizer_vectors.py` "
                                 "fetches and extracts the sdist")
            data["variants"] += _variants(Llama, vpath, overrides, texts, {"vocab": vocab})
        out = FIXTURES / f"tokenizer_{name}.json"
        out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out} ({len(cases)} cases, {len(data['detok'])} detok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
