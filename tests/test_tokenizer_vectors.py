"""llama.cpp's own tokenizer test vectors, run through Tokenizer.from_gguf.

The llama-cpp-python==0.3.36 sdist carries llama.cpp's `models/ggml-vocab-<name>.gguf`
(vocabulary-only GGUFs) with `.gguf.inp` (texts separated by "\\n__ggml_vocab_test__\\n") and
`.gguf.out` (one line of expected ids per text), which llama.cpp's test-tokenizer-0 checks with
add_special=false, parse_special=false. Every vocabulary in the sdist is listed in VOCABS with
what we expect of it: its vectors pass exactly, or it is refused with the reason named (a
tokenizer kind no family we serve uses). A vocabulary added to the sdist and not listed fails
the inventory test. The sdist is fetched with pip when it is not cached (as tests/randmodels.py
does), so this runs in CI.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from ostinato.loader.gguf import read_gguf
from ostinato.tokenizer import Tokenizer

SEP = "\n__ggml_vocab_test__\n"

PASS = "pass"
NO_VECTORS = "no vectors"      # the sdist ships the GGUF without .inp/.out: it must load
# name -> PASS, NO_VECTORS, or the refusal's message (a regex). Refused: tokenizer kinds no
# family we serve uses (WordPiece for BERT embedders, Unigram for T5-style ones, Gemma 4's
# byte-free BPE with SentencePiece normalisation).
VOCABS = {
    "aquila": NO_VECTORS, "baichuan": NO_VECTORS, "gpt-neox": NO_VECTORS,
    "command-r": PASS, "deepseek-coder": PASS, "deepseek-llm": PASS, "falcon": PASS,
    "gpt-2": PASS, "llama-bpe": PASS, "llama-spm": PASS, "mpt": PASS, "phi-3": PASS,
    "qwen2": PASS, "qwen35": PASS, "refact": PASS, "starcoder": PASS,
    "bert-bge": "unsupported tokenizer model 'bert'",
    "nomic-bert-moe": "unsupported tokenizer model 't5'",
    "gemma-4": "unsupported tokenizer model 'gemma4'",
}


def llama_cpp_models_dir() -> Path:
    """llama.cpp's models/ (vocab GGUFs, vectors, templates/) from the llama-cpp-python sdist
    under $OSTINATO_HOME/sdist, extracted once; the sdist is pip-downloaded when absent."""
    from randmodels import LLAMA_CPP_PYTHON, converter_dir
    home = Path(os.environ.get("OSTINATO_HOME", Path.home() / ".cache" / "ostinato")) / "sdist"
    stem = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    models = home / stem / "vendor" / "llama.cpp" / "models"
    if (models / "templates").is_dir() and list(models.glob("*.gguf.inp")):
        return models
    if not (home / f"{stem}.tar.gz").exists():
        converter_dir(download=True)          # pip download of the sdist
    prefix = f"{stem}/vendor/llama.cpp/models/"
    with tarfile.open(home / f"{stem}.tar.gz") as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.isfile()]
        tf.extractall(home, members=members, filter="data")
    return models


def read_vectors(gguf: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, split as llama.cpp's test-tokenizer-0 splits them."""
    raw = gguf.with_suffix(".gguf.inp").read_text(encoding="utf-8")
    texts = raw.split(SEP)
    if texts and texts[-1] == "":
        texts.pop()                            # the file ends with a separator
    lines = gguf.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines), f"{gguf.name}: {len(texts)} texts, {len(lines)} id lines"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@pytest.fixture(scope="module")
def models_dir() -> Path:
    return llama_cpp_models_dir()


def _vocab(models_dir: Path, name: str) -> Path:
    return models_dir / f"ggml-vocab-{name}.gguf"


def test_every_vocab_in_the_sdist_is_listed(models_dir):
    found = {p.name[len("ggml-vocab-"):-len(".gguf")] for p in models_dir.glob("ggml-vocab-*.gguf")}
    assert found == set(VOCABS), f"unlisted: {found - set(VOCABS)}, gone: {set(VOCABS) - found}"
    with_vectors = {n for n in found if _vocab(models_dir, n).with_suffix(".gguf.inp").exists()}
    assert {n for n, v in VOCABS.items() if v == PASS} <= with_vectors
    assert not with_vectors & {n for n, v in VOCABS.items() if v == NO_VECTORS}


@pytest.mark.parametrize("name", [n for n, v in VOCABS.items() if v == PASS])
def test_vectors_match_llama_cpp(models_dir, name):
    path = _vocab(models_dir, name)
    tok = Tokenizer.from_gguf(read_gguf(path).metadata, str(path))
    cases = read_vectors(path)
    assert len(cases) >= 40
    wrong = [(text[:40], got[:10], ids[:10]) for text, ids in cases
             if (got := tok.encode(text, add_special_tokens=False, parse_special=False)) != ids]
    assert not wrong, f"{name}: {len(wrong)} of {len(cases)} differ: {wrong[:5]}"
    # byte-level BPE and SentencePiece with byte fallback are lossless on these texts
    lossy = [text[:40] for text, ids in cases if tok.decode(ids) != text]
    assert not lossy, f"{name}: decode(ids) != text for {lossy[:5]}"


@pytest.mark.parametrize("name", [n for n, v in VOCABS.items() if v not in (PASS, NO_VECTORS)])
def test_unsupported_vocabs_are_refused(models_dir, name):
    path = _vocab(models_dir, name)
    with pytest.raises(ValueError, match=VOCABS[name]):
        Tokenizer.from_gguf(read_gguf(path).metadata, str(path))


@pytest.mark.parametrize("name", [n for n, v in VOCABS.items() if v == NO_VECTORS])
def test_vocabs_without_vectors_load(models_dir, name):
    path = _vocab(models_dir, name)
    tok = Tokenizer.from_gguf(read_gguf(path).metadata, str(path))
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_parse_special_false_tokenizes_control_texts_as_text(models_dir):
    """llama.cpp's parse_special=false: a CONTROL token's text is plain text."""
    path = _vocab(models_dir, "qwen2")
    tok = Tokenizer.from_gguf(read_gguf(path).metadata, str(path))
    end = tok.token_id("<|endoftext|>")
    assert tok.encode("a<|endoftext|>", add_special_tokens=False) == [*tok.encode("a"), end]
    plain = tok.encode("a<|endoftext|>", add_special_tokens=False, parse_special=False)
    assert end not in plain and tok.decode(plain) == "a<|endoftext|>"
