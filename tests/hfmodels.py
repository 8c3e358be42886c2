"""Variants of the tiny Hugging Face folders tests/randmodels.py builds, for tests of the
safetensors-folder loader (tests/test_hf_folder.py): resharded with an index, converted to
bf16, config.json edited, hostile safetensors headers. A small safetensors writer of our own
(the format: 8-byte little-endian header length, a JSON header, the tensors' bytes) so that
bf16 and deliberately wrong headers can be written without torch."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from plancheck import logits_of, ostinato_llm  # noqa: F401  (re-exported: the families tests' own)

_ITEM = {"F32": 4, "F16": 2, "BF16": 2}


def read_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """{name: (dtype, shape, bytes)} of every safetensors file in the folder."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        data = f.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            out[name] = (info["dtype"], tuple(info["shape"]), data[8 + n + lo:8 + n + hi])
    return out


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
                      header_patch: dict | None = None) -> Path:
    """Write tensors; header_patch {name: {field: value}} overrides header fields (to forge)."""
    header, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    for name, fields in (header_patch or {}).items():
        header[name].update(fields)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return Path(path)


def copy_folder(src: Path, dst: Path, weights: bool = True) -> Path:
    """The folder's config/tokenizer files (and its safetensors files if weights)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and (weights or not f.name.endswith((".safetensors", ".index.json"))):
            shutil.copy(f, dst / f.name)
    return dst


def reshard(src: Path, dst: Path, n_shards: int = 3) -> Path:
    """The same tensors in n_shards files with a model.safetensors.index.json."""
    dst = copy_folder(src, dst, weights=False)
    items = sorted(read_tensors(src).items())
    weight_map = {}
    for k in range(n_shards):
        name = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = dict(items[k::n_shards])
        write_safetensors(dst / name, part)
        weight_map |= {t: name for t in part}
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def half_pair(src: Path, dst: Path, kind: str = "BF16") -> tuple[Path, Path]:
    """(half folder, f32 folder holding the very same values): every F32 tensor rounded to
    BF16 or F16 (to nearest even), stored once as that and once widened back to F32."""
    half, f32 = copy_folder(src, dst / kind, False), copy_folder(src, dst / "f32", False)
    as_half, as_f32 = {}, {}
    for name, (dtype, shape, raw) in read_tensors(src).items():
        assert dtype == "F32"
        if kind == "BF16":
            bits = np.frombuffer(raw, dtype="<u4")
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
            wide = (rounded.astype("<u4") << 16).view("<f4")
        else:
            rounded = np.frombuffer(raw, dtype="<f4").astype("<f2")
            wide = rounded.astype("<f4")
        as_half[name] = (kind, shape, rounded.tobytes())
        as_f32[name] = ("F32", shape, wide.tobytes())
    write_safetensors(half / "model.safetensors", as_half)
    write_safetensors(f32 / "model.safetensors", as_f32)
    return half, f32


def edit_config(src: Path, dst: Path, **changes) -> Path:
    dst = copy_folder(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst




# ---------------------------------------------------------------------------------------------
# one tiny checkpoint per architecture the folder loader maps (loader/hf_arch.py ARCHES),
# to compare its GGUF view with llama.cpp's converter whether or not the decoder runs it yet
# ---------------------------------------------------------------------------------------------
def _common(**kw) -> dict:
    base = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=None)
    return base | kw


def arch_configs() -> dict:
    import transformers as t
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    return {
        "MistralForCausalLM": lambda: t.MistralConfig(**_common(sliding_window=None,
                                                                head_dim=16)),
        "MixtralForCausalLM": lambda: t.MixtralConfig(**_common(
            num_local_experts=4, num_experts_per_tok=2, sliding_window=None, head_dim=16)),
        "Qwen2ForCausalLM": lambda: t.Qwen2Config(**_common(rope_parameters=rope)),
        "Qwen3ForCausalLM": lambda: t.Qwen3Config(**_common(head_dim=32, rope_parameters=rope)),
        "Qwen3MoeForCausalLM": lambda: t.Qwen3MoeConfig(**_common(
            head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, rope_parameters=rope)),
        "Phi3ForCausalLM": lambda: t.Phi3Config(**_common(pad_token_id=0, rope_parameters=rope)),
        "Gemma2ForCausalLM": lambda: t.Gemma2Config(**_common(
            head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, pad_token_id=0)),
        "Olmo2ForCausalLM": lambda: t.Olmo2Config(**_common(pad_token_id=0)),
        "GraniteForCausalLM": lambda: t.GraniteConfig(**_common(
            embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
            logits_scaling=8.0)),
        "SmolLM3ForCausalLM": lambda: t.SmolLM3Config(**_common(pad_token_id=0)),
    }


def build_arch(arch: str, out: Path) -> Path:
    """A tiny random checkpoint of `arch` saved as a folder (tokenizer: randmodels' llama
    vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM

    from randmodels import _VOCABS, _hf_tokenizer, randomize
    config = arch_configs()[arch]()
    folder = Path(out) / arch
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, config, 0)
    model.save_pretrained(str(folder))
    _hf_tokenizer(_VOCABS["llama"](config.vocab_size)).save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# a real byte-level vocabulary as tokenizer.json: a GGUF's tokens and merges laid out the way
# Hugging Face saves that model family's tokenizer (model, pre-tokenizer, added tokens)
# ---------------------------------------------------------------------------------------------
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_json_from_gguf(gguf_path, folder: Path) -> Path:
    """Write folder/tokenizer.json (+ config.json's vocab_size) from a gpt2-kind GGUF whose
    pre-tokenizer is 'smollm' or 'qwen2'; CONTROL tokens become special added tokens,
    USER_DEFINED ones non-special added tokens, UNUSED ones are left out."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pt

    from ostinato.loader.gguf import read_gguf
    md = read_gguf(gguf_path).metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"].tolist()
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (1, 3, 4)}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    pre = md["tokenizer.ggml.pre"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False,
                               ignore_merges=pre == "llama-bpe"))
    if pre in ("qwen2", "llama-bpe"):
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        split = _QWEN2_SPLIT if pre == "qwen2" else _QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
        tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(split), "isolated"),
                                         pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "gpt-2":
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    else:               # smollm, starcoder: digits one by one, then GPT-2's split
        tok.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                         pt.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4):
            tok.add_tokens([AddedToken(t, special=ty == 3, normalized=False)])
            assert tok.token_to_id(t) == i, (t, i)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(tokens)}))
    return folder


def vocab_vectors(name: str) -> tuple[Path, list[tuple[str, list[int]]]] | None:
    """llama.cpp's models/ggml-vocab-<name>.gguf and its test vectors ((text, ids) pairs,
    tokenized by llama.cpp without special tokens), where the sdist is extracted; else None."""
    from randmodels import converter_dir
    conv = converter_dir()
    gguf = conv / "models" / f"ggml-vocab-{name}.gguf" if conv else None
    if gguf is None or not gguf.with_suffix(".gguf.inp").exists():
        return None
    texts = gguf.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(
        "\n__ggml_vocab_test__\n")
    texts = texts[:-1] if texts and texts[-1] == "" else texts
    lines = gguf.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines)
    return gguf, [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def folder_from_gguf(gguf_path: Path, out: Path, arch: str) -> Path:
    """A real model as a Hugging Face folder: transformers dequantizes the GGUF (to float32,
    q/k rows back in HF's order) and we save weights, config, tokenizer and generation
    config as save_pretrained would (transformers will not save a GGUF-loaded model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_diff_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [arch]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    return out
