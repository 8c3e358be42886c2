"""Tokenizer built from GGUF metadata, matching llama.cpp's `llama_tokenize` token for token.

Two vocabulary kinds (`tokenizer.ggml.model`):

* ``"gpt2"``  byte-level BPE. Text is split by the pre-tokenizer regexes chosen by
  `tokenizer.ggml.pre` (the same regex list llama.cpp uses for that name, applied one after
  the other, each to the pieces the previous one produced, keeping the unmatched gaps as
  pieces too); every piece is mapped byte -> printable character (GPT-2's table) and merged
  by `tokenizer.ggml.merges` rank, lowest rank first, leftmost first on ties.
* ``"llama"`` SentencePiece-style BPE. Spaces become U+2581 ('▁'); starting from single
  characters, the adjacent pair whose concatenation is the vocabulary token with the highest
  score is merged first (leftmost on ties) until no pair forms a token; characters left over
  fall back to their `<0xNN>` byte tokens.

In both, special tokens (token types CONTROL, USER_DEFINED and UNKNOWN) are first cut out of
the text, longest token text first, and emitted as single ids (llama.cpp's
``tokenize(..., parse_special=True)``).

Differences from llama.cpp, on purpose: `decode` never applies llama.cpp's "clean spaces"
pass (it would break `decode(encode(t)) == t`), and per-model LSTRIP/RSTRIP token attributes
(set by llama.cpp only for phi-3/jina/modern-bert by model name) are not modelled.
"""
from __future__ import annotations

import codecs
import heapq
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Iterable

import numpy as np
import regex

# tokenizer.ggml.token_type values (llama.cpp's LLAMA_TOKEN_TYPE_*)
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)
# types cut out of raw text as whole tokens before the word-level tokenizer runs
_PARTITIONED = (CONTROL, USER_DEFINED, UNKNOWN)
# types that decode to nothing unless special tokens are rendered
_HIDDEN_UNLESS_SPECIAL = (CONTROL, UNKNOWN)

SPACE_MARK = "\u2581"  # '▁', SentencePiece's visible space
# SentencePiece words: a run of space marks and what follows up to the next space mark that
# follows another character (Tokenizer._init_spm_words)
_SPM_WORD = re.compile(f"{SPACE_MARK}*[^{SPACE_MARK}]*")
_MAX_BRIDGES = 64      # more tokens with an inner space mark: merge whole texts

# Token texts llama.cpp treats as end-of-generation (and forces to CONTROL) whatever the model.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

# ---------------------------------------------------------------------------------------------
# pre-tokenizer regexes (byte-level BPE). Semantics follow llama.cpp's llm_tokenizer_bpe; its
# hand-written splitters for the GPT-2 and Llama-3 patterns are equivalent to these regexes.
# ---------------------------------------------------------------------------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS_ANY_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 3.5: Qwen 2's pattern with combining marks (\p{M}) kept inside words
_QWEN35 = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-4o (o200k) and Tekken split words at case changes. As llama.cpp writes them, "upper" is
# any letter but a-z and "lower" any letter but A-Z: a non-ASCII letter is both, and combining
# marks are not letters (the tokenizer.json originals use \p{Lu}/\p{Ll}/\p{M} classes).
_UPPER, _LOWER = r"(?:(?=\p{L})[^a-z])", r"(?:(?=\p{L})[^A-Z])"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS_ANY_CASE}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS_ANY_CASE}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM: newlines alone; runs of cased letters (Unicode's L&, as DeepSeek's tokenizer.json
# enumerates them); runs of ASCII/full-width punctuation; trailing spaces; CJK/Hangul; numbers.
_DEEPSEEK_CASED = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False   # a piece that is itself a vocabulary token skips the merges
    add_bos: bool = False         # llama.cpp's default before tokenizer.ggml.add_bos_token


_PRE_DEFAULT = _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_PRE_GPT2 = _PreTokenizer((_GPT2,))
_PRE_SMOLLM = _PreTokenizer((r"\p{N}", _GPT2))          # digits one by one, then GPT-2
_PRE_LLAMA3 = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_QWEN2 = _PreTokenizer((_QWEN2,))
_PRE_QWEN35 = _PreTokenizer((_QWEN35,))
_PRE_DBRX = _PreTokenizer((_LLAMA3,))                    # Llama 3's regex, merges as usual
_PRE_GPT4O = _PreTokenizer((_GPT4O,))
_PRE_TEKKEN = _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)
_PRE_FALCON = _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))
_PRE_DEEPSEEK_LLM = _PreTokenizer((r"[\r\n]", rf"\s?[{_DEEPSEEK_CASED}]+",
                                   _DEEPSEEK_PUNCT,
                                   r"\s+\Z", _CJK_HANGUL, r"\p{N}+"))
_PRE_DEEPSEEK_CODER = _PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL,
                                     r"\p{N}"))

PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PRE_DEFAULT, "": _PRE_DEFAULT,
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _PRE_GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _PRE_SMOLLM),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _PRE_LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _PRE_QWEN2),
    "qwen35": _PRE_QWEN35,
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PRE_DBRX),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _PRE_GPT4O),
    "tekken": _PRE_TEKKEN,
    "falcon": _PRE_FALCON,
    "deepseek-llm": _PRE_DEEPSEEK_LLM,
    "deepseek-coder": _PRE_DEEPSEEK_CODER,
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table: printable latin-1 bytes map to themselves,
    the other 68 bytes to U+0100.. in byte order, so every byte string becomes a printable str."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
_LATIN1_TO_BYTE_CHAR = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}  # for str.translate


_CACHE_WORDS = 200_000     # words a tokenizer's cache keeps (the first seen; then no more)
_CACHE_WORD_CHARS = 64     # longer words are merged every time: the cache stays a few MB


def _cached(cache: dict[str, tuple[int, ...]], word: str, merge) -> tuple[int, ...]:
    """merge(word), looked up in / added to `cache` within its bounds."""
    ids = cache.get(word)
    if ids is None:
        ids = merge(word)
        if len(word) <= _CACHE_WORD_CHARS and len(cache) < _CACHE_WORDS:
            cache[word] = ids
    return ids


def _split_by_regexes(text: str, patterns: list[regex.Pattern]) -> list[str]:
    """Apply each pattern to every piece from the previous pattern; matches and the gaps
    between them both become pieces (llama.cpp's unicode_regex_split). Lookarounds see only
    the piece being split, never its neighbours."""
    pieces = [text]
    for pat in patterns:
        out: list[str] = []
        for piece in pieces:
            pos = 0
            for m in pat.finditer(piece):
                start, end = m.span()
                if start == end:
                    continue
                if start > pos:
                    out.append(piece[pos:start])
                out.append(piece[start:end])
                pos = end
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids for one GGUF model. Build with `Tokenizer.from_gguf(metadata)`."""

    def __init__(self, *, model: str, tokens: list[str], token_types: list[int],
                 scores: list[float] | None, merges: list[str] | None, pre: str,
                 bos_token_id: int | None, eos_token_id: int | None,
                 unknown_token_id: int | None, add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, eog_ids: Iterable[int] = (),
                 chat_template: str | None = None, path: str = ""):
        if model not in ("gpt2", "llama"):
            raise ValueError(f"{path or 'GGUF'}: unsupported tokenizer model {model!r} "
                             "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        self.model, self.path = model, path
        # an empty token text can never match; llama.cpp renames it the same way
        self._tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._types = list(token_types)
        self._scores = list(scores) if scores is not None else [0.0] * len(tokens)
        self._token_to_id = {t: i for i, t in enumerate(self._tokens)}
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.unknown_token_id = unknown_token_id
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self.chat_template = chat_template
        self._template_reads: frozenset[str] | None = None     # its free variables, lazily
        self.eos_token_ids = self._end_of_generation_ids(eog_ids)
        self._init_special_matcher()
        if model == "gpt2":
            self._init_bpe(merges, pre)
        else:
            self._byte_ids = [self._byte_token(b) for b in range(256)]
            self._init_spm_words()
        self._pieces = [self._piece_bytes(i) for i in range(len(self._tokens))]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, metadata: dict, path: str = "") -> "Tokenizer":
        """Build from `read_gguf(path).metadata`; `path` only names the file in errors.
        Defaults for absent keys are llama.cpp's for the vocabulary kind."""
        where = path or "GGUF metadata"
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"{where}: unsupported tokenizer model {model!r} "
                             "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{where}: tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        types = _int_list(metadata.get("tokenizer.ggml.token_type"), n, NORMAL, where, "token_type")
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is not None:
            if len(scores) < n:
                raise ValueError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries "
                                 f"for {n} tokens")
            scores = [float(s) for s in scores[:n]]
            # SentencePiece merges highest score first: a NaN has no order, and the merges (so
            # the ids) would depend on where it sits in the heap; byte-level BPE never reads them
            bad = next((i for i, s in enumerate(scores) if math.isnan(s)), None) \
                if model == "llama" else None
            if bad is not None:
                raise ValueError(f"{where}: tokenizer.ggml.scores[{bad}] is NaN (token "
                                 f"{str(tokens[bad])[:40]!r}): merges need ordered scores")
        merges = metadata.get("tokenizer.ggml.merges")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        spm = model == "llama"
        if not spm:
            if not isinstance(merges, list):
                raise ValueError(f"{where}: gpt2 tokenizer needs tokenizer.ggml.merges")
            if pre not in PRE_TOKENIZERS:
                known = ", ".join(sorted(k for k in PRE_TOKENIZERS if k))
                raise ValueError(f"{where}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} "
                                 f"(supported: {known})")

        def special_id(key: str, default: int | None) -> int | None:
            """A special token id; out of range (or absent, without default) -> None."""
            v = metadata.get(f"tokenizer.ggml.{key}", default)
            if v is not None and not isinstance(v, (int, np.integer)):
                raise ValueError(f"{where}: tokenizer.ggml.{key} must be an integer, got {v!r}")
            return int(v) if v is not None and 0 <= int(v) < n else None

        default_add_bos = True if spm else PRE_TOKENIZERS[pre].add_bos
        eog = [special_id(k, None) for k in ("eot_token_id", "eom_token_id")]
        return cls(
            model=model, tokens=tokens, token_types=types, scores=scores, merges=merges, pre=pre,
            bos_token_id=special_id("bos_token_id", 1 if spm else 11),
            eos_token_id=special_id("eos_token_id", 2 if spm else 11),
            unknown_token_id=special_id("unknown_token_id", 0 if spm else None),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=spm and bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
            eog_ids=[i for i in eog if i is not None],
            chat_template=metadata.get("tokenizer.chat_template"), path=path)

    def _end_of_generation_ids(self, extra: Iterable[int]) -> frozenset[int]:
        """eos + metadata eot/eom + tokens whose text llama.cpp knows as end-of-turn markers.
        Like llama.cpp, those marker tokens are made CONTROL so they decode as special."""
        ids = set(extra)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        for text in _EOG_TEXTS:
            i = self._token_to_id.get(text)
            if i is not None:
                ids.add(i)
                if self._types[i] != CONTROL:
                    self._types[i] = CONTROL
        return frozenset(ids)

    def _init_special_matcher(self) -> None:
        """Index the partitioned tokens by first character and by length, so finding which
        of them occur in a text costs a few dict lookups per candidate position."""
        self._special_ids: dict[str, int] = {}
        for i, t in enumerate(self._tokens):
            if self._types[i] in _PARTITIONED:
                self._special_ids.setdefault(t, i)
        lengths: dict[str, set[int]] = {}
        for t in self._special_ids:
            lengths.setdefault(t[0], set()).add(len(t))
        self._special_lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._special_first = (regex.compile("[" + "".join(regex.escape(c) for c in lengths) + "]")
                               if lengths else None)

    def _init_bpe(self, merges: list[str], pre: str) -> None:
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            cut = m.find(" ", 1)
            pair = (m[:cut], m[cut + 1:]) if cut >= 0 else ("", "")
            self._ranks.setdefault(pair, rank)       # first occurrence wins, as in llama.cpp
        self._pre = PRE_TOKENIZERS[pre]
        self._pre_patterns = [regex.compile(p) for p in self._pre.regexes]
        self._word_cache: dict[str, tuple[int, ...]] = {}

    def _byte_token(self, b: int) -> int | None:
        """SentencePiece byte-fallback token for byte b: `<0xNN>`, else the 1-byte token."""
        i = self._token_to_id.get(f"<0x{b:02X}>")
        if i is None:
            i = self._token_to_id.get(chr(b)) if b < 0x80 else None
        return i if i is not None else self.unknown_token_id

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_token(self) -> str:
        return self._tokens[self.bos_token_id] if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self._tokens[self.eos_token_id] if self.eos_token_id is not None else ""

    def token_type(self, token_id: int) -> int:
        return self._types[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL/UNKNOWN tokens: the ones `skip_special_tokens` drops."""
        return self._types[self._check_id(token_id)] in _HIDDEN_UNLESS_SPECIAL

    def token_id(self, text: str) -> int | None:
        """The id whose vocabulary text is exactly `text`, or None."""
        return self._token_to_id.get(text)

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._tokens):
            raise ValueError(f"token id {token_id} out of range (vocab size {len(self._tokens)})")
        return token_id

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_special_tokens: bool = True,
               parse_special: bool = True) -> list[int]:
        """Token ids of `text`. Special-token texts in `text` (e.g. `<|im_start|>`) become
        their single ids; with parse_special=False only USER_DEFINED ones do, CONTROL texts
        are tokenized as plain text (llama.cpp's parse_special). With add_special_tokens,
        BOS/EOS are added per the GGUF's add_bos_token/add_eos_token."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs str, got {type(text).__name__}")
        out: list[int] = []
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            out.append(self.bos_token_id)
        prev_special = True   # SentencePiece: a space prefix goes before text at the start...
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True   # ...and after every special token
            elif self.model == "gpt2":
                self._encode_bpe(frag, out)
                prev_special = False
            else:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._encode_spm(frag.replace(" ", SPACE_MARK), out)
                prev_special = False
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            out.append(self.eos_token_id)
        return out

    def _partition(self, text: str, parse_special: bool = True) -> list[str | int]:
        """Cut special tokens out of text: longest token text first (ties: lower id), each one
        splitting every remaining raw-text fragment at its non-overlapping leftmost matches.
        Returns raw strings and token ids in text order; empty strings are dropped."""
        if not text:
            return []
        found = self._specials_in(text)
        if not parse_special:
            found = {t for t in found if self._types[self._special_ids[t]] == USER_DEFINED}
        frags: list[str | int] = [text]
        for tok in sorted(found, key=lambda t: (-len(t), self._special_ids[t])):
            tid = self._special_ids[tok]
            nxt: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    nxt.append(f)
                    continue
                parts = f.split(tok)
                for k, part in enumerate(parts):
                    if k:
                        nxt.append(tid)
                    if part:
                        nxt.append(part)
            frags = nxt
        return frags

    def _specials_in(self, text: str) -> set[str]:
        """Every special token text that occurs somewhere in text."""
        found: set[str] = set()
        if self._special_first is None:
            return found
        n = len(text)
        for m in self._special_first.finditer(text):
            p = m.start()
            for length in self._special_lengths[text[p]]:
                if p + length <= n and text[p:p + length] in self._special_ids:
                    found.add(text[p:p + length])
        return found

    # byte-level BPE --------------------------------------------------------------------
    def _encode_bpe(self, text: str, out: list[int]) -> None:
        for word in _split_by_regexes(text, self._pre_patterns):
            out.extend(_cached(self._word_cache, word, self._bpe_byte_word))

    def _bpe_byte_word(self, word: str) -> tuple[int, ...]:
        return self._bpe_word(word.encode("utf-8").decode("latin-1")
                              .translate(_LATIN1_TO_BYTE_CHAR))

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Merge one byte-encoded word: lowest merge rank first, leftmost on ties."""
        if self._pre.ignore_merges and word in self._token_to_id:
            return (self._token_to_id[word],)
        syms = list(word)                       # syms[i] == "" once merged into its left
        nxt = list(range(1, len(syms) + 1))
        prv = list(range(-1, len(syms) - 1))
        ranks = self._ranks
        heap: list[tuple[int, int, int, str]] = []   # (rank, left index, right index, text)

        def push(left: int, right: int) -> None:
            if left >= 0 and right < len(syms):
                rank = ranks.get((syms[left], syms[right]))
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(len(syms) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                continue                        # stale: a neighbour changed since the push
            syms[left], syms[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] < len(syms):
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        ids: list[int] = []
        for s in syms:
            if not s:
                continue
            tid = self._token_to_id.get(s)
            if tid is not None:
                ids.append(tid)
            else:   # llama.cpp: try each UTF-8 byte of the symbol as a token, drop misses
                ids.extend(self._token_to_id[c] for c in s.encode("utf-8").decode("latin-1")
                           if c in self._token_to_id)
        return tuple(ids)

    # SentencePiece ---------------------------------------------------------------------
    def _init_spm_words(self) -> None:
        """A merge only ever joins two symbols into a token, so a text splits without
        changing its tokens wherever no token could span the cut: before a space mark that
        follows another character, unless the vocabulary has tokens with a space mark after
        another character (`bridges`; Gemma 3 has one in 262,144) and one occurs in the text.
        The words then merge alone, and a word seen before is looked up (Gemma 3, a
        1,600-token prompt: of English words 32-36 -> 7-8 ms, of random tokens 36-39 -> 24
        ms; a server tokenizes on a thread beside the engine's, whose steps it slows)."""
        bridges = [t for t in self._token_to_id if SPACE_MARK in t.lstrip(SPACE_MARK)]
        self._spm_bridges = bridges if len(bridges) <= _MAX_BRIDGES else None
        self._spm_cache: dict[str, tuple[int, ...]] = {}

    def _encode_spm(self, text: str, out: list[int]) -> None:
        """SentencePiece merges, word by word where that gives the same tokens
        (_init_spm_words), else over the whole text."""
        if self._spm_bridges is None or any(b in text for b in self._spm_bridges):
            self._merge_spm(text, out)
            return
        for word in _SPM_WORD.findall(text):
            out.extend(_cached(self._spm_cache, word, self._spm_word))

    def _spm_word(self, word: str) -> tuple[int, ...]:
        merged: list[int] = []
        self._merge_spm(word, merged)
        return tuple(merged)

    def _merge_spm(self, text: str, out: list[int]) -> None:
        """Merge adjacent symbols whose concatenation is a token, highest score first
        (leftmost on ties); leftovers that are not tokens become byte tokens."""
        n = len(text)
        if n == 0:
            return
        start = list(range(n))                  # symbol i covers text[start[i]:start[i]+size[i]]
        size = [1] * n                          # 0 once merged into its left neighbour
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        t2i, scores = self._token_to_id, self._scores
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, combined size)

        def push(left: int, right: int) -> None:
            if left < 0 or right >= n:
                return
            s = start[left]
            tid = t2i.get(text[s:s + size[left] + size[right]])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, size[left] + size[right]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue                        # stale entry
            size[left], size[right] = total, 0
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        i = 0
        while i < n:
            piece = text[start[i]:start[i] + size[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(b for b in (self._byte_ids[x] for x in piece.encode("utf-8"))
                           if b is not None)
            i = nxt[i]

    def fewest_tokens(self, text: str, cap: int | None = None) -> int:
        """A lower bound on len(encode(text)), without encoding it, so that a server can
        refuse a text too long for its context at once (a 200 KB word takes this tokenizer
        seconds). The larger of two bounds: each token stands for at most as many characters
        as its vocabulary text has ('Ġ' and '▁' one each, '<0x0A>' one byte); and a run of
        one class of ASCII characters (letters, digits, punctuation, white space) needs at
        least _run_tokens of them (with a cap, each run longer than it; else every run).
        Characters that encoding may drop (a byte with no token) are not counted; 0 where
        that cannot be told. Past `cap` it stops looking."""
        if self._droppable is None:
            return 0
        kept = len(text) - sum(text.count(c) for c in self._droppable)
        fewest = -(-kept // self._longest_text)
        data = None
        for mask, pieces in self._run_pieces:
            if cap is not None and fewest > cap:
                break
            data = data if data is not None else text.encode("utf-8", "surrogatepass")
            for run in _long_runs(data, data.translate(mask), cap):
                fewest = max(fewest, _run_tokens(run, pieces, cap))
                if cap is not None and fewest > cap:
                    break
        return fewest

    @cached_property
    def _longest_text(self) -> int:
        """Characters of the longest vocabulary text."""
        return max(1, max(map(len, self._tokens)))

    @cached_property
    def _run_pieces(self) -> list[tuple[bytes, dict[int, np.ndarray]]]:
        """Per class of ASCII characters (_RUN_CLASSES), a bytes.translate table that maps
        the class's bytes to "1" and every other to "0", and, by length, the sorted window
        hashes (_window_hasher) of every maximal run of the class within what one token may
        stand for: the parts of a run of the class in a text that one token can cover. A
        class whose characters encoding may drop is left out."""
        every = b"\0".join(self._bound_texts())
        out = []
        for cls in _RUN_CLASSES:
            if re.search(f"[{cls}]", self._droppable):
                continue
            by_len: dict[int, list[bytes]] = {}
            for part in set(re.findall(f"[{cls}]+".encode(), every)):
                by_len.setdefault(len(part), []).append(part)
            mask = bytes(ord("1") if re.match(f"[{cls}]", chr(c)) else ord("0")
                         for c in range(256))
            out.append((mask, {n: np.sort(_window_hasher(b"".join(parts))(n)[::n])
                         for n, parts in by_len.items()}))
        return out

    def _bound_texts(self) -> list[bytes]:
        """What each token may stand for in a text, every reading of it: the bytes it
        decodes to, and its vocabulary text as it is, with '▁' as a space, and through
        GPT-2's byte table (encoding looks a text up whatever the token's type: an unused
        or user-defined token decodes to nothing, or keeps its '▁', yet may be emitted)."""
        out = list(self._pieces)            # a normal token's is its one reading
        for text in (t for t, kind in zip(self._tokens, self._types) if kind != NORMAL):
            out += [text.encode("utf-8", "surrogatepass"),
                    text.replace(SPACE_MARK, " ").encode("utf-8", "surrogatepass")]
            if all(c in _CHAR_TO_BYTE for c in text):
                out.append(bytes(_CHAR_TO_BYTE[c] for c in text))
        return out

    @cached_property
    def _droppable(self) -> str | None:
        """The characters encoding may drop (ASCII bytes with no token: SmolLM2 has none for
        0x04, 0x06, 0x13, 0x14, 0x16 and 0x1D), or None when it cannot tell (a continuation
        byte with no token, or a BPE merge that makes no token): every other character
        ends up, whole or in part, in some token."""
        t2i = self._token_to_id
        if self.model == "gpt2":
            missing = [b for b, c in enumerate(_BYTE_TO_CHAR) if c not in t2i]
            if any(a + b not in t2i for a, b in self._ranks):
                return None
        else:
            missing = [b for b, i in enumerate(self._byte_ids) if i is None]
        if any(0x80 <= b < 0xC0 for b in missing):
            return None
        return "".join(chr(b) for b in missing if b < 0x80)

    # ------------------------------------------------------------------ decode
    def id_to_piece(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (e.g. 'Ġhello', '▁hello', '<0x0A>')."""
        return self._tokens[self._check_id(token_id)]

    def token_to_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes this token stands for: GPT-2 byte decoding for gpt2 vocabularies; '▁' ->
        ' ' and <0xNN> -> byte for llama ones. CONTROL/UNKNOWN tokens give their text when
        `special`, else b''; unused/undefined tokens give b''."""
        self._check_id(token_id)
        if not special and self._types[token_id] in _HIDDEN_UNLESS_SPECIAL:
            return b""
        return self._pieces[token_id]

    def _piece_bytes(self, token_id: int) -> bytes:
        text, kind = self._tokens[token_id], self._types[token_id]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if kind == NORMAL:
            if self.model == "llama":
                return text.replace(SPACE_MARK, " ").encode("utf-8")
            # a char outside GPT-2's byte table is kept as its own UTF-8 (llama.cpp prints junk)
            return b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode("utf-8")
                            for c in text)
        if kind == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return b""

    def _strips_space(self, token_id: int) -> bool:
        """SentencePiece with add_space_prefix: the first text token of a sequence lost its
        leading space on the way out, as encode() put it there. BOS and other CONTROL tokens
        before it do not count as text."""
        return self.add_space_prefix and self._types[token_id] not in _HIDDEN_UNLESS_SPECIAL

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of `ids` (may end inside a UTF-8 character); see decode()."""
        out = bytearray()
        at_start = True
        for tid in ids:
            piece = self.token_to_bytes(int(tid), special=not skip_special_tokens)
            if at_start and self._strips_space(int(tid)):
                at_start = False
                if piece.startswith(b" "):
                    piece = piece[1:]
            out += piece
        return bytes(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.
        With skip_special_tokens, CONTROL/UNKNOWN tokens (BOS, <|im_end|>, ...) are dropped."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            variables: dict | None = None, tools: list[dict] | None = None) -> str:
        """Render `messages` ([{"role", "content"}], roles system/user/assistant/tool, content
        a str or a list of {"type": "text", "text": str} parts) to a prompt string.

        With the model's `tokenizer.chat_template`, it is rendered in a sandboxed Jinja2
        environment (see ostinato.tokenizer.render_chat_template) with `messages`,
        `add_generation_prompt`, `bos_token`, `eos_token`, `tools` (OpenAI-style function
        schemas, or None), `documents` (None) and `variables` (chat_template_kwargs: each must
        be one the template reads, and none of those six, else ChatTemplateError). As in HF
        transformers, `tools` and `documents` are always defined, None when not given.

        continue_final_message: the prompt ends inside the final message, right after its
        content (no end-of-turn, no new turn), so generation continues it: assistant prefill.
        It excludes add_generation_prompt (ValueError).

        Fallback when the model has no template (e.g. Gemma 3 270M base): a plain transcript,
        one line per message, "System: ...", "User: ...", "Assistant: ...", "Tool: ..." (the
        content as is, lines joined by "\\n"), and with add_generation_prompt a final
        "Assistant:" line with no trailing space or newline. No BOS text is added; encode()
        adds BOS per the model's metadata.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude each other")
        msgs = _validate_messages(messages)
        extra = dict(variables or {})
        self._check_template_variables(extra)
        if self.chat_template is None:
            if tools is not None:
                raise ChatTemplateError("this model has no chat template to write tools with")
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
            if add_generation_prompt:
                lines.append("Assistant:")
            text = "\n".join(lines)
        else:
            text = render_chat_template(self.chat_template, messages=msgs,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token,
                                        tools=tools, documents=None, **extra)
        return _cut_after_final(text, msgs[-1]["content"]) if continue_final_message else text

    def _check_template_variables(self, extra: dict) -> None:
        """Extra variables must be ones the template reads, and not the six it is given."""
        reserved = sorted(_TEMPLATE_VARIABLES & set(extra))
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(reserved)}")
        if not extra:
            return
        if self.chat_template is None:
            raise ChatTemplateError("chat_template_kwargs: this model has no chat template "
                                    "(its plain transcript takes no variables)")
        if self._template_reads is None:
            self._template_reads = template_variables(self.chat_template)
        unused = sorted(set(extra) - self._template_reads)
        if unused:
            raise ChatTemplateError(f"chat_template_kwargs: the model's chat template does not "
                                    f"read {', '.join(unused)}")


class ChatTemplateError(ValueError):
    """chat_template_kwargs the template cannot take."""


_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                                 "tools", "documents"})


def _cut_after_final(text: str, content: str) -> str:
    """`text` up to the end of the final message's content, wherever the template put it
    (as given, or trimmed if the template trims it)."""
    for needle in (content, content.strip()):
        at = text.rfind(needle) if needle else -1
        if at >= 0:
            return text[: at + len(needle)]
    raise ValueError("continue_final_message: the final message's content is empty or the "
                     "chat template does not write it as given")


def _int_list(values, n: int, default: int, where: str, key: str) -> list[int]:
    if values is None:
        return [default] * n
    if len(values) < n:
        raise ValueError(f"{where}: tokenizer.ggml.{key} has {len(values)} entries for {n} tokens")
    return [int(v) for v in values[:n]]


# ---------------------------------------------------------------------------------------------
# streaming detokenization
# ---------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turn generated ids into text as they arrive.

    `add(id)` returns only whole characters: bytes of a multi-byte UTF-8 character cut across
    tokens are held back until it completes (bytes that can never form a character come out
    as U+FFFD, exactly as in decode()). The concatenation of all `add()` outputs plus
    `flush()` equals the text that `decode(prompt_ids + generated)` adds after
    `decode(prompt_ids)`, so with no prompt it equals `decode(generated)`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] | None = None,
                 skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # whether the SentencePiece leading-space rule still applies to the next text token
        self._at_start = not any(tokenizer._strips_space(int(t)) for t in (prompt_ids or ()))
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        piece = self._tok.token_to_bytes(int(token_id), special=not self._skip)
        if self._at_start and self._tok._strips_space(int(token_id)):
            self._at_start = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back, an unfinished character as U+FFFD; then start clean."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---------------------------------------------------------------------------------------------
# chat templates
# ---------------------------------------------------------------------------------------------
MAX_TEMPLATE_OUTPUT = 1_000_000     # characters a template may produce
MAX_TEMPLATE_ITERATIONS = 100_000   # range() items summed over one render
MAX_TEMPLATE_SEQUENCE = 100_000     # longest str/list `*` or `+` may build
MAX_TEMPLATE_LOOP_STEPS = 1_000_000  # `{% for %}` items summed over one render (~0.5 s)
_LOOP_GUARD = "__ostinato_loop_guard"   # the global every for-loop's iterable goes through
_ROLES = ("system", "user", "assistant", "tool")


def _validate_messages(messages) -> list[dict]:
    """Check roles and content types; flatten text-part lists into one string."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{k}] must be a dict, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise ValueError(f"messages[{k}]: role must be one of {', '.join(_ROLES)}; "
                             f"got {role!r}")
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""                    # a turn of calls only: no text (OpenAI's null)
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"messages[{k}]: content parts must be "
                                 "{'type': 'text', 'text': str}")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{k}]: content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        out.append({**m, "content": content})
    return out


def render_chat_template(template: str, **variables) -> str:
    """Render a model's chat template in Jinja2's immutable sandbox (no attribute access to
    internals, no mutation of passed objects, no file loading), with what HF transformers'
    chat templates rely on: trim_blocks and lstrip_blocks, loop controls, `raise_exception(msg)`,
    `strftime_now(fmt)`, a `tojson` filter taking json.dumps' ensure_ascii/indent/separators/
    sort_keys (non-ASCII kept, keys in the given order, no HTML escaping) and the
    `{% generation %}` block (rendered as its body). Beyond transformers: `tojson` also takes
    the generators `map`/`select` give, and `list.append`/`list.pop` work (Kimi K2's queue;
    a list is capped at MAX_TEMPLATE_SEQUENCE items; the variables are copied first, so a
    template never changes the caller's objects).

    Limits: a `range` whose items are counted against MAX_TEMPLATE_ITERATIONS per render,
    `{% for %}` items (over anything: strings, lists, dicts) counted against
    MAX_TEMPLATE_LOOP_STEPS, so nested loops cannot run for hours, `*`/`+` refused beyond
    MAX_TEMPLATE_SEQUENCE items, output capped at MAX_TEMPLATE_OUTPUT chars. Violations raise jinja2.exceptions.SecurityError; template errors raise Jinja2's
    TemplateError subclasses; `raise_exception` raises ValueError with the message."""
    env = _make_sandbox()
    budget = [MAX_TEMPLATE_ITERATIONS]
    env.globals["range"] = lambda *a: _budgeted_range(budget, *a)
    steps = [MAX_TEMPLATE_LOOP_STEPS]
    env.globals[_LOOP_GUARD] = lambda iterable: _budgeted_iter(steps, iterable)
    variables = {k: _plain_copy(v) for k, v in variables.items()}
    try:
        chunks, total = [], 0
        for chunk in env.from_string(_guard_loops(env, template)).generate(**variables):
            total += len(chunk)
            if total > MAX_TEMPLATE_OUTPUT:
                raise _security_error(f"chat template output exceeds {MAX_TEMPLATE_OUTPUT} "
                                      "characters")
            chunks.append(chunk)
    except RecursionError:
        raise _security_error("chat template recursion too deep") from None
    return "".join(chunks)


def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from its caller (Jinja2's undeclared variables)."""
    from jinja2 import meta
    env = _make_sandbox()
    return frozenset(meta.find_undeclared_variables(env.parse(template)))


def _security_error(msg: str) -> Exception:
    from jinja2.exceptions import SecurityError
    return SecurityError(msg)


def _guard_loops(env, template: str):
    """The template's syntax tree with every for-loop iterating `_LOOP_GUARD(iterable)`."""
    from jinja2 import nodes
    tree = env.parse(template)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name(_LOOP_GUARD, "load"), [loop.iter], [], None, None)
    return tree


def _budgeted_iter(steps: list[int], iterable):
    for item in iterable:
        steps[0] -= 1
        if steps[0] < 0:
            raise _security_error(f"chat template loops over budget: more than "
                                  f"{MAX_TEMPLATE_LOOP_STEPS} items in one render")
        yield item


def _budgeted_range(budget: list[int], *args):
    r = range(*args)
    if len(r) > budget[0]:
        raise _security_error(f"chat template range() over budget: {len(r)} items, "
                              f"{budget[0]} left of {MAX_TEMPLATE_ITERATIONS}")
    budget[0] -= len(r)
    return r


def _raise_exception(message):
    raise ValueError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """json.dumps with its own options, as HF transformers' tojson (Jinja's escapes HTML
    characters and sorts keys); iterators (a `map` result) are written as lists."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys, default=_json_iterable)


def _json_iterable(value):
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict)):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _plain_copy(value):
    """A copy of dicts/lists/tuples all the way down (scalars and other objects shared)."""
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_copy(v) for v in value)
    return value


_sandbox_factory = None


def _make_sandbox():
    """A fresh environment of our ImmutableSandboxedEnvironment subclass; the class is
    built on first use so importing this module does not import jinja2."""
    global _sandbox_factory
    if _sandbox_factory is None:
        from jinja2 import BaseLoader
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _NoFiles(BaseLoader):
            def get_source(self, environment, name):
                raise _security_error(f"chat templates may not load other templates ({name!r})")

        class _Sandbox(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "**", "+"})

            def is_safe_attribute(self, obj, attr, value):
                if attr in ("append", "pop") and type(obj) is list:
                    return True                 # append size-checked in call()
                return super().is_safe_attribute(obj, attr, value)

            def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's names)
                owner = getattr(__obj, "__self__", None)
                if type(owner) is list and getattr(__obj, "__name__", "") == "append" \
                        and len(owner) >= MAX_TEMPLATE_SEQUENCE:
                    raise _security_error(f"chat template list over {MAX_TEMPLATE_SEQUENCE} items")
                return super().call(__context, __obj, *args, **kwargs)

            def call_binop(self, context, operator, left, right):
                if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                        and (right > 64 or abs(left).bit_length() * right > 4096):
                    raise _security_error("chat template power too large")
                if operator in ("*", "+"):
                    _check_sequence_size(operator, left, right)
                return super().call_binop(context, operator, left, right)

        def factory():
            env = _Sandbox(trim_blocks=True, lstrip_blocks=True, loader=_NoFiles(),
                           extensions=["jinja2.ext.loopcontrols", _generation_extension()])
            env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
            env.filters["tojson"] = _tojson
            return env

        _sandbox_factory = factory
    return _sandbox_factory()


def _generation_extension():
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
    transformers): rendered as its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def _check_sequence_size(op: str, left, right) -> None:
    seq = (str, bytes, list, tuple)
    if op == "*":
        for a, b in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(b, int) and len(a) * b > MAX_TEMPLATE_SEQUENCE:
                raise _security_error(f"chat template `*` would build {len(a) * b} items")
    elif isinstance(left, seq) and isinstance(right, seq):
        if len(left) + len(right) > MAX_TEMPLATE_OUTPUT:
            raise _security_error("chat template `+` result too large")


_RUN_CLASSES = ("A-Za-z", "0-9", "!-/:-@\\[-`{-~", " \\t\\n\\r")   # as regex classes
_HASH_BASE = 0x9E3779B97F4A7C15                    # odd: it has an inverse mod 2**64
_HASH_INVERSE = pow(_HASH_BASE, -1, 1 << 64)


def _powers(base: int, count: int) -> np.ndarray:
    """base**k mod 2**64 for k < count (numpy's uint64 products wrap)."""
    out = np.full(count, base, dtype=np.uint64)
    out[:1] = 1
    return np.cumprod(out, dtype=np.uint64)


def _window_hasher(data: bytes):
    """A function of n: the hash of each n-byte window of data, sum of byte[k] * B**k (mod
    2**64), from prefix sums: one pass over data a length, whatever the length."""
    size = len(data)
    codes = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    prefix = np.zeros(size + 1, dtype=np.uint64)
    np.cumsum(codes * _powers(_HASH_BASE, size), out=prefix[1:])
    inverse = _powers(_HASH_INVERSE, size)

    def windows(n: int) -> np.ndarray:
        return (prefix[n:] - prefix[:size - n + 1]) * inverse[:size - n + 1]
    return windows


def _long_runs(data: bytes, mask: bytes, cap: int | None):
    """The runs of one class in data (mask: its bytes as "1", others "0") longer than cap
    bytes (a run of at most cap cannot prove more than cap tokens), every run where cap is
    None; found by bytes.find (a regex over 14 MB held the GIL for seconds)."""
    needle = b"1" * ((cap or 0) + 1)
    at = mask.find(needle)
    while at >= 0:
        end = mask.find(b"0", at)
        end = len(mask) if end < 0 else end
        yield data[at:end]
        at = mask.find(needle, end)


def _run_tokens(run: bytes, pieces: dict[int, np.ndarray], cap: int | None) -> int:
    """A lower bound on the tokens that cover `run`, a run of one class of characters,
    when each token covers a part of it that is one of `pieces` (hashes by length): the
    fewest jumps across it when a jump may start anywhere already covered and reaches as
    far as the longest piece that starts there (so overlaps, shorter prefixes and hash
    collisions only lower it below the fewest pieces that tile it). A random 100,000-letter
    word gets 55,445 from SmolLM2's vocabulary and takes 59,852 tokens; its length over
    the longest piece says 4,000.
    Read in chunks, each with the bytes a piece from its end could reach; stops past cap."""
    size, span = len(run), max(pieces, default=1)
    jumps = end = carried = 0
    for at in range(0, size, _RUN_CHUNK):
        stop = min(size, at + _RUN_CHUNK)
        windows = _window_hasher(run[at:stop + span - 1])
        longest = np.ones(stop - at, dtype=np.int64)    # a lone character: a piece, or no help
        for n in sorted(pieces):
            if at + n <= size:
                h = windows(n)[:stop - at]
                hashes = pieces[n]
                found = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
                longest[:len(h)][hashes[found] == h] = n
        reach = np.maximum.accumulate(np.maximum(np.arange(at, stop) + longest, carried))
        carried = int(reach[-1])
        reach = reach.tolist()
        while end < stop:
            end, jumps = reach[end - at], jumps + 1
            if cap is not None and jumps > cap:
                return jumps
    return jumps


_RUN_CHUNK = 1 << 15
