"""A Hugging Face folder's tokenizer as GGUF `tokenizer.ggml.*` keys, so ostinato's Tokenizer
(built by Tokenizer.from_gguf) tokenizes it as it does the GGUF of the same model.

tokenizer.json, BPE model only, in one of two shapes:
* byte-level BPE (a ByteLevel pre-tokenizer): `tokenizer.ggml.model` "gpt2", the merges, and
  the pre-tokenizer name read from the pre-tokenizer's structure and split regex (GPT-2,
  SmolLM's digits + GPT-2, Llama 3, Qwen 2); another structure is refused.
* SentencePiece-style BPE with byte fallback (spaces replaced by U+2581): "llama", whose
  merge-by-score rule replays the merges when a merged token's score is minus its merge rank.
Token types: added special tokens CONTROL (the unk token UNKNOWN), other added tokens
USER_DEFINED, `<0xNN>` BYTE; ids the vocabulary leaves out up to config.json's vocab_size are
`[PADn]` UNUSED, as the converter writes them.

tokenizer_config.json gives bos/eos/pad, add_bos_token/add_eos_token (else the post-processor's
template decides) and chat_template; chat_template.jinja wins over it, as in transformers.
generation_config.json's eos ids (an int or a list) end generation too (returned apart: GGUF
has one eos key).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ModelFileError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
# split regexes of the byte-level pre-tokenizers we know, by llama.cpp pre-tokenizer name
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_SPLITS = {
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def tokenizer_metadata(path: Path, config: dict) -> tuple[dict, list[int]]:
    """({tokenizer.* key: value}, further eos ids from generation_config.json)."""
    tj = path / "tokenizer.json"
    if not tj.is_file():
        if (path / "tokenizer.model").is_file():
            out = sentencepiece_metadata(path / "tokenizer.model", config)
            _added_tokens_decoder(path, out)
            # no post-processor to ask: SentencePiece tokenizers (LlamaTokenizer) add bos
            # unless tokenizer_config.json says otherwise, as llama.cpp assumes for them
            bos_template = {"post_processor": {"type": "TemplateProcessing", "single": [
                {"SpecialToken": {}}, {"Sequence": {}}]}}
            specials, extra_eos = _specials(path, bos_template, out["tokenizer.ggml.tokens"],
                                            config)
            return out | specials, extra_eos
        raise ModelFileError(f"{path}: no tokenizer.json or tokenizer.model")
    data = read_json(tj)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelFileError(f"{tj}: tokenizer model {model.get('type')!r} is not supported "
                             f"(BPE only)")
    tokens, added = _tokens(tj, model, data.get("added_tokens") or [], config)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if _is_byte_level(data):
        out = _gpt2(tj, data, merges)
    else:
        out = _spm(tj, data, tokens, merges)
    out["tokenizer.ggml.tokens"] = tokens
    out["tokenizer.ggml.token_type"] = _types(tokens, added, model.get("unk_token"),
                                              out["tokenizer.ggml.model"] == "llama")
    specials, extra_eos = _specials(path, data, tokens, config)
    return out | specials, extra_eos


def read_json(file: Path) -> dict:
    """A folder's JSON file as an object; unreadable or not an object: one line naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{file}: unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _tokens(tj: Path, model: dict, added: list, config: dict) -> tuple[list[str], dict]:
    """Token texts by id (vocabulary, then added tokens; gaps and the rows config.json's
    vocab_size adds are [PADn]) and {id: added token entry}."""
    by_id: dict[int, str] = {}
    for text, i in (model.get("vocab") or {}).items():
        by_id[int(i)] = text
    added_by_id = {}
    for a in added:
        by_id[int(a["id"])] = a["content"]
        added_by_id[int(a["id"])] = a
    rows = config.get("vocab_size") or 0
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise ModelFileError(f"{tj.parent}/config.json: vocab_size {rows!r} is not an integer")
    n = max(max(by_id, default=-1) + 1, rows)
    if n > 1 << 22 or min(by_id, default=0) < 0:
        raise ModelFileError(f"{tj}: token ids out of range")
    return [by_id.get(i, f"[PAD{i}]") for i in range(n)], added_by_id


def _types(tokens: list[str], added: dict, unk: str | None, spm: bool) -> list[int]:
    out = []
    for i, t in enumerate(tokens):
        a = added.get(i)
        if a is not None:
            out.append(UNKNOWN if t == unk else CONTROL if a.get("special") else USER_DEFINED)
        elif t == f"[PAD{i}]":
            out.append(UNUSED)
        elif spm and _BYTE_TOKEN.fullmatch(t):
            out.append(BYTE)
        else:
            out.append(NORMAL)
    return out


def _parts(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") != "Sequence":
        return [node]
    return (node.get("pretokenizers") or node.get("normalizers") or node.get("processors")
            or node.get("decoders") or [])


def _is_byte_level(data: dict) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _parts(data.get("pre_tokenizer")))


def _gpt2(tj: Path, data: dict, merges: list[str]) -> dict:
    norm = data.get("normalizer")
    if norm and norm.get("type") != "NFC":
        raise ModelFileError(f"{tj}: normalizer {norm.get('type')!r} of a byte-level tokenizer "
                             f"is not supported")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.pre": _pre_name(tj, data.get("pre_tokenizer"))}


def _pre_name(tj: Path, pre: dict) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level pre-tokenizer structure."""
    parts = [dict(p) for p in _parts(pre)]
    kinds = [p.get("type") for p in parts]
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
        raise ModelFileError(f"{tj}: ByteLevel add_prefix_space is not supported")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") \
            and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True) \
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
        name = _SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ModelFileError(f"{tj}: byte-level pre-tokenizer {json.dumps(pre)[:200]} is not one "
                         f"Ostinato knows (GPT-2, SmolLM, Llama 3, Qwen 2)")


def _spm(tj: Path, data: dict, tokens: list[str], merges: list[str]) -> dict:
    if not (data.get("model") or {}).get("byte_fallback"):
        raise ModelFileError(f"{tj}: a BPE tokenizer that is neither byte-level nor "
                             f"SentencePiece-style (byte_fallback) is not supported")
    prefix = _space_prefix(tj, data)
    rank = {}
    for r, m in enumerate(merges):
        a, _, b = m.partition(" ")
        rank.setdefault(a + b, r)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.add_space_prefix": prefix}


# Gemma's pre-tokenizer: a split at " " after the normalizer replaced every " " (a no-op)
_SPLIT_ON_SPACE = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                   "invert": False}


def _space_prefix(tj: Path, data: dict) -> bool:
    """Spaces -> U+2581 by a Replace normalizer (a Prepend first: a leading one) or by a
    Metaspace pre-tokenizer; anything else is refused."""
    norm = _parts(data.get("normalizer"))
    pre = [p for p in _parts(data.get("pre_tokenizer")) if p != _SPLIT_ON_SPACE]
    kinds = [n.get("type") for n in norm]
    if not pre and kinds in (["Replace"], ["Prepend", "Replace"]) \
            and norm[-1].get("content") == SPACE and norm[-1].get("pattern") == {"String": " "}:
        return kinds[0] == "Prepend" and norm[0].get("prepend") == SPACE
    if not norm and [p.get("type") for p in pre] == ["Metaspace"] \
            and pre[0].get("replacement") == SPACE and not pre[0].get("split", False):
        return pre[0].get("prepend_scheme", "always") in ("always", "first")
    raise ModelFileError(f"{tj}: SentencePiece-style normalizer {json.dumps(norm)[:120]} / "
                         f"pre-tokenizer {json.dumps(pre)[:120]} is not supported")


def _specials(path: Path, data: dict, tokens: list[str], config: dict) -> tuple[dict, list]:
    tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() \
        else {}
    gc = read_json(path / "generation_config.json") \
        if (path / "generation_config.json").is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def token_id(key: str) -> int | None:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            if v not in ids:
                raise ModelFileError(f"{path}/tokenizer_config.json: {key} {v!r} is not a token")
            return ids[v]
        fallback = gc.get(f"{key}_id", config.get(f"{key}_id"))
        return fallback[0] if isinstance(fallback, list) and fallback else fallback \
            if isinstance(fallback, int) else None

    out = {"tokenizer.ggml.bos_token_id": token_id("bos_token"),
           "tokenizer.ggml.eos_token_id": token_id("eos_token"),
           "tokenizer.ggml.padding_token_id": token_id("pad_token"),
           "tokenizer.ggml.unknown_token_id": ids.get((data.get("model") or {}).get("unk_token"))}
    out = {k: v for k, v in out.items() if v is not None}
    out |= _add_bos_eos(tc, data, out)
    template = _chat_template(path, tc)
    if template is not None:
        out["tokenizer.chat_template"] = template
    eos = [e for src in (gc.get("eos_token_id"), config.get("eos_token_id"))
           for e in (src if isinstance(src, list) else [src]) if isinstance(e, int)]
    main = out.get("tokenizer.ggml.eos_token_id")
    return out, sorted({e for e in eos if e != main and 0 <= e < len(tokens)})


def _add_bos_eos(tc: dict, data: dict, ids: dict) -> dict:
    """add_bos_token / add_eos_token from tokenizer_config.json, else from the
    post-processor's single-sequence template (a bos before $A, an eos after)."""
    tp = [p for p in _parts(data.get("post_processor")) if p.get("type") == "TemplateProcessing"]
    single = tp[0].get("single") or [] if tp else []
    first = single[0].get("SpecialToken") if single else None
    last = single[-1].get("SpecialToken") if single else None
    return {"tokenizer.ggml.add_bos_token": bool(tc.get("add_bos_token", first is not None)),
            "tokenizer.ggml.add_eos_token": bool(tc.get("add_eos_token", last is not None
                                                        and len(single) > 1))}


def _chat_template(path: Path, tc: dict) -> str | None:
    file = path / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    t = tc.get("chat_template")
    if isinstance(t, list):         # named templates: the default one
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


# ---------------------------------------------------------------------------------------------
# tokenizer.model (a SentencePiece ModelProto), read with a small protobuf reader of our own:
# pieces (1: piece, 2: score, 3: type), trainer_spec (3: model_type), normalizer_spec
# (3: add_dummy_prefix). Used when a folder has no tokenizer.json.
# ---------------------------------------------------------------------------------------------
_SPM_TYPES = {2: UNKNOWN, 3: CONTROL, 5: UNUSED, 6: BYTE}      # the rest (normal, user) NORMAL


def sentencepiece_metadata(file: Path, config: dict) -> dict:
    """GGUF keys as convert_hf_to_gguf.py's sentencepiece path writes them: every piece with
    its score and type, [PADn] rows (score -10000, UNUSED) up to config.json's vocab_size."""
    try:
        fields = _proto(file.read_bytes())
        pieces = [_piece(_proto(raw)) for raw in fields.get(1, [])]
        trainer = _proto(fields[2][-1]) if 2 in fields else {}
        norm = _proto(fields[3][-1]) if 3 in fields else {}
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{file}: not a SentencePiece model ({e})") from None
    if trainer.get(3, [1])[-1] != 2:
        raise ModelFileError(f"{file}: SentencePiece model type {trainer.get(3, [1])[-1]} is not "
                             f"supported (BPE, type 2, only)")
    n = max(len(pieces), int(config.get("vocab_size") or 0))
    pad = [(f"[PAD{i}]", -10000.0, UNUSED) for i in range(len(pieces), n)]
    tokens, scores, types = zip(*(pieces + pad)) if pieces else ((), (), ())
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": list(tokens), "tokenizer.ggml.scores": list(scores),
            "tokenizer.ggml.token_type": list(types),
            "tokenizer.ggml.add_space_prefix": bool(norm.get(3, [1])[-1])}


def _added_tokens_decoder(path: Path, out: dict) -> None:
    """tokenizer_config.json's added_tokens_decoder over the SentencePiece pieces, as the
    converter applies it: special ones CONTROL, the others USER_DEFINED."""
    file = path / "tokenizer_config.json"
    decoder = (read_json(file).get("added_tokens_decoder") or {}) if file.is_file() else {}
    tokens, types = out["tokenizer.ggml.tokens"], out["tokenizer.ggml.token_type"]
    for key, entry in decoder.items():
        i = int(key)
        if not 0 <= i < len(tokens) or not isinstance(entry, dict):
            raise ModelFileError(f"{file}: added token {key!r} is outside the vocabulary")
        tokens[i] = str(entry.get("content", tokens[i]))
        types[i] = CONTROL if entry.get("special") else USER_DEFINED


def _piece(f: dict) -> tuple[str, float, int]:
    import struct
    score = struct.unpack("<f", f[2][-1])[0] if 2 in f else 0.0
    return f[1][-1].decode("utf-8"), score, _SPM_TYPES.get(f.get(3, [1])[-1], NORMAL)


def _proto(buf: bytes) -> dict[int, list]:
    """One protobuf message: {field number: [values]} (varints as int, 32/64-bit fields and
    length-delimited ones as bytes). Every length is checked against the bytes left."""
    out, pos = {}, 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            val, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        out.setdefault(field, []).append(val)
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    val = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated protobuf varint")
        b = buf[pos]
        val |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return val, pos
