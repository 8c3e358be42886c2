"""Tiny random-weight models for tests: a transformers checkpoint folder plus GGUF files of the
same weights, built at test time (seeded, a few hundred kB each). A plain test-support module
(like serverproc.py), imported by test modules:

    from randmodels import FAMILIES, build, llamacpp_logits, test_ids

    m = build("llama", tmp_path)            # TinyModel: hf_dir, ggufs {"f32": ..., "q8_0": ...}
    ids = test_ids(m)                       # bos + 47 deterministic ids
    ref = m.hf_logits(ids)                  # (T, vocab) float32, transformers fp32, eager attention
    got = llamacpp_logits(m.ggufs["f32"], ids)

The weights are informative on purpose: linear weights ~ N(0, 0.2) (q/k projections N(0, 0.1),
see QK_STD), norm scales 1 + 0.3*N(0, 1)
(Gemma's HF norm stores w with scale (1 + w), so w ~ 0.3*N(0, 1) there), biases ~ N(0, 0.1)
where a family has them, so the logits are far from uniform and a wrong rope, norm, mask or
permutation changes them a lot.

GGUF files are written the way llama.cpp's convert_hf_to_gguf.py writes them for the
architecture (same metadata keys and value types, tensor names, Q/K row permutation for llama,
Gemma's +1 on norm weights, the `rope_freqs` factors for llama3 rope scaling, F32 for 1-D
tensors and norms, the chosen type for every other `.weight`), checked against the real
converter by tests/test_randmodels.py when its source is cached (see `converter_dir`). Only the
tokenizer differs: ours is a small SentencePiece-style (`tokenizer.ggml.model` = "llama") vocab
built here, written both as GGUF tokenizer keys and as an HF tokenizer.json.

Adding a family: a function returning the transformers config, registered in FAMILIES; if its
`model_type` is new, a `GGUFArch` subclass registered in ARCHES (metadata keys + tensor names).
"""
from __future__ import annotations

import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

SEQ_LEN = 48          # test_ids' default length; the rope/window settings below are chosen for it
VOCAB = 384           # rows of every tiny model (a multiple of 32)
LLAMA_CPP_PYTHON = "0.3.36"   # the sdist whose convert_hf_to_gguf.py the cross-check runs

# ---------------------------------------------------------------------------------------------
# families: name -> transformers config
# ---------------------------------------------------------------------------------------------


def _llama_kwargs() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="silu",
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.2)


def llama_config():
    """Plain Llama: SwiGLU, GQA 4/2, head_dim 32, rope theta 10000 without scaling, untied
    output. GGUF q/k rows are permuted from rotate-half to adjacent pairs."""
    from transformers import LlamaConfig
    return LlamaConfig(**_llama_kwargs(), rope_parameters={"rope_type": "default",
                                                           "rope_theta": 10000.0})


def llama3_rope_config():
    """Llama with Llama-3.1 rope scaling. head_dim 32 and theta 10000 give 16 frequencies whose
    wavelengths (2*pi*10000**(i/16): 6.3, 11.2, 19.9, 35.3, 62.8, 111.7, ...) fall in all three
    bands for original_max_position_embeddings 64 (high-frequency band: wavelength < 64/4 = 16,
    unscaled; low band: > 64/1, divided by 8; between: smoothed), so the GGUF's `rope_freqs`
    tensor is [1, 1, 1.29, 2.77, 7.67, 8, ...]."""
    from transformers import LlamaConfig
    return LlamaConfig(**_llama_kwargs(), rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


def gemma3_linear_rope_config():
    """Gemma 3 text model: 6 layers in llama.cpp's fixed pattern (5 sliding-window layers of
    window 12, then 1 global layer; the GGUF cannot say otherwise, llama.cpp's converter writes
    no pattern key), global rope theta 1e6 with linear scaling x8, local theta 1000 unscaled
    (`rope.freq_base_swa`; a reader defaulting to 10000 gets different logits), q/k norms,
    pre/post norms, GeGLU (gelu_pytorch_tanh), embeddings scaled by sqrt(hidden), tied output.
    head_dim 32 != hidden/heads. query_pre_attn_scalar = head_dim: llama.cpp scales queries by
    1/sqrt(head_dim) for every Gemma 3 size but 27B, whatever the config says."""
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        max_position_embeddings=512, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        sliding_window=12, layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        tie_word_embeddings=True, attention_bias=False, final_logit_softcapping=None,
        attn_logit_softcapping=None, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        initializer_range=0.2)


def _small(**kw) -> dict:
    """The shape most of the families below share: 2 layers, d 128, GQA 4/2, ff 192."""
    base = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=None, initializer_range=0.2)
    return base | kw


def qwen2_config():
    """Qwen2 / 2.5: biases on q, k and v; NeoX rotary (theta 1e6)."""
    from transformers import Qwen2Config
    return Qwen2Config(**_small(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                use_sliding_window=False))


def qwen3_config():
    """Qwen3: q/k RMSNorm per head before rotary; head_dim 48 != hidden / heads (32)."""
    from transformers import Qwen3Config
    return Qwen3Config(**_small(head_dim=48, attention_bias=False, use_sliding_window=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6}))


def qwen3moe_config():
    """Qwen3-MoE: 4 experts of width 64, top 2 renormalised, on both layers."""
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(**_small(head_dim=32, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=64, norm_topk_prob=True,
                                   decoder_sparse_step=1, mlp_only_layers=[],
                                   attention_bias=False, use_sliding_window=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}))


def mixtral_config():
    """Mixtral (GGUF arch llama): 4 experts, top 2 renormalised; Llama's permuted q/k rows."""
    from transformers import MixtralConfig
    return MixtralConfig(**_small(head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                                  sliding_window=None,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}))


def phi3_longrope_config():
    """Phi-3 with LongRoPE over 3/4 of each head (as Phi-4-mini): fused qkv and gate|up, NeoX
    rotary over the first 24 of 32 dims, short and long factors, attention factor
    sqrt(1 + ln 8 / ln 256) from max_position 2048 over an original 256. The short factors
    apply (the engine's context and the test sequence fit in 256)."""
    from transformers import Phi3Config
    rng = np.random.default_rng(7)
    short = (1.0 + rng.random(12) * 3).round(3).tolist()
    long = (2.0 + rng.random(12) * 12).round(3).tolist()
    return Phi3Config(**_small(max_position_embeddings=2048, original_max_position_embeddings=256,
                               pad_token_id=0, sliding_window=None,
                               rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": short, "long_factor": long,
                                                "partial_rotary_factor": 0.75}))


def gemma2_config():
    """Gemma 2: attention soft-cap 1 and final soft-cap 6 (both bind on these weights), pre and
    post norms, every other layer slides (window 12), GeGLU, sqrt(d) embedding scale, tied."""
    from transformers import Gemma2Config
    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        max_position_embeddings=512, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        sliding_window=12, attn_logit_softcapping=1.0, final_logit_softcapping=6.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        initializer_range=0.2)


def olmo2_config():
    """OLMo 2: norms after attention and the MLP only, q/k norms over the whole projection."""
    from transformers import Olmo2Config
    return Olmo2Config(**_small(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def granite_config():
    """Granite: embedding x12, residual x0.22, attention scale 0.05 (not 1/sqrt(32)), logits
    / 1.5; Llama's layout otherwise."""
    from transformers import GraniteConfig
    return GraniteConfig(**_small(embedding_multiplier=12.0, residual_multiplier=0.22,
                                  attention_multiplier=0.05, logits_scaling=1.5,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def smollm3_config():
    """SmolLM3: 4 layers, the 4th without rotary."""
    from transformers import SmolLM3Config
    return SmolLM3Config(**_small(num_hidden_layers=4, no_rope_layer_interval=4,
                                  use_sliding_window=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


FAMILIES: dict[str, Callable] = {
    "llama": llama_config,
    "llama3_rope": llama3_rope_config,
    "gemma3_linear_rope": gemma3_linear_rope_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "qwen3moe": qwen3moe_config,
    "mixtral": mixtral_config,
    "phi3_longrope": phi3_longrope_config,
    "gemma2": gemma2_config,
    "olmo2": olmo2_config,
    "granite": granite_config,
    "smollm3": smollm3_config,
}


def without_rope_scaling(config):
    """A copy of `config` whose rope parameters keep their theta but drop any scaling (for the
    test that scaling changes the logits)."""
    import copy
    c = copy.deepcopy(config)
    rp = c.rope_parameters
    if "full_attention" in rp or "sliding_attention" in rp:
        c.rope_parameters = {k: {"rope_type": "default", "rope_theta": v["rope_theta"]}
                             for k, v in rp.items()}
    else:
        c.rope_parameters = {"rope_type": "default", "rope_theta": rp["rope_theta"]}
    return c


# ---------------------------------------------------------------------------------------------
# tokenizer: a small SentencePiece-style BPE vocabulary (byte fallback), trained here on a
# fixed text so that ordinary English text tokenizes into multi-character pieces
# ---------------------------------------------------------------------------------------------
SPACE = "\u2581"
_TEXT = (
    "the quick brown fox jumps over the lazy dog and then the dog sleeps in the sun while the "
    "fox runs into the forest where there are other animals that live in the trees and on the "
    "ground there is a river that flows through the forest and into the sea it is a long way "
    "to the sea but the water goes there every day in the morning and in the evening the "
    "animals come to the river to drink the water is cold and clean and the fish in it are "
    "quick and small Hello world This is a test of the tokenizer 0123456789 one two three"
)
_CHARS = (SPACE + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
          ".,!?'-:;()\"")

# token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[tuple[str, str]]
    bos: int
    eos: int
    unk: int
    pad: int | None
    add_space_prefix: bool

    @property
    def first_plain(self) -> int:
        """Ids below this are special tokens."""
        return next(i for i, t in enumerate(self.types) if t in (_NORMAL, _BYTE))


def _train_merges(n: int) -> list[tuple[str, str]]:
    """n BPE merges learnt from _TEXT (most frequent adjacent pair first, ties by the pair)."""
    words: dict[tuple[str, ...], int] = {}
    for w in _TEXT.split():
        key = tuple(SPACE + w)
        words[key] = words.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n:
        counts: dict[tuple[str, str], int] = {}
        for w, f in words.items():
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new: dict[tuple[str, ...], int] = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + f
        words = new
    return merges


def make_vocab(specials: list[tuple[str, int]], size: int, *, bos: str, eos: str, unk: str,
               pad: str | None, add_space_prefix: bool) -> Vocab:
    """specials (text, type) first, then the 256 `<0xNN>` byte tokens, single characters, and
    learnt merges up to `size` tokens. Scores: merges by rank (first merge highest), so the
    SentencePiece 'highest score first' rule replays the BPE merge order."""
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)]
    types = [ty for _, ty in specials] + [_BYTE] * 256
    n_merges = size - len(tokens) - len(_CHARS)
    merges = []
    seen = set(tokens) | set(_CHARS)
    for a, b in _train_merges(n_merges + 64):
        if a + b not in seen and len(merges) < n_merges:
            merges.append((a, b))
            seen.add(a + b)
    scores = [0.0] * len(tokens)
    for i, (a, b) in enumerate(merges):
        tokens.append(a + b)
        scores.append(-float(i))
        types.append(_NORMAL)
    for i, c in enumerate(_CHARS):
        tokens.append(c)
        scores.append(-float(len(merges) + i))
        types.append(_NORMAL)
    assert len(tokens) == size and len(set(tokens)) == size, (len(tokens), size)
    ix = {t: i for i, t in enumerate(tokens)}
    return Vocab(tokens, scores, types, merges, ix[bos], ix[eos], ix[unk],
                 ix[pad] if pad else None, add_space_prefix)


def _hf_tokenizer(v: Vocab):
    """The same vocabulary as a transformers fast tokenizer (BPE with byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    merges = v.merges
    bpe = models.BPE(vocab={t: i for i, t in enumerate(v.tokens)}, merges=merges,
                     unk_token=v.tokens[v.unk], byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    norm = [normalizers.Replace(" ", SPACE)]
    if v.add_space_prefix:
        norm.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    bos = v.tokens[v.bos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, v.bos)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(v.tokens, v.types)
                            if ty in (_CONTROL, _UNKNOWN, _USER_DEFINED)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=v.tokens[v.eos], unk_token=v.tokens[v.unk],
        pad_token=v.tokens[v.pad] if v.pad is not None else None, add_bos_token=True,
        add_eos_token=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# GGUF writers per HF model_type
# ---------------------------------------------------------------------------------------------
def _f32_type(name: str, ndim: int) -> bool:
    """llama.cpp's converter keeps these F32 whatever the output type: 1-D tensors, norms,
    anything not named `.weight` (biases), the experts' router."""
    return (ndim <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight"))
            or not name.endswith(".weight"))


class GGUFArch:
    """How one HF model_type becomes GGUF: the metadata keys and the tensors."""
    arch: str = ""

    def __init__(self, config, vocab: Vocab):
        self.c, self.vocab = config, vocab

    def rope(self, kind: str = "full_attention") -> dict:
        rp = self.c.rope_parameters
        return rp.get(kind, rp) if ("full_attention" in rp or "sliding_attention" in rp) else rp

    def write_params(self, w) -> None:
        """The keys TextModel.set_gguf_parameters writes (for the hparams our configs have)."""
        c = self.c
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        import gguf
        full = self.rope("full_attention")
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        if (local := self.c.rope_parameters.get("sliding_attention")) is not None:
            w.add_rope_freq_base_swa(local["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        if getattr(c, "head_dim", None) is not None and self.arch != "granite":   # it pops it
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)

    def write_vocab(self, w) -> None:
        import gguf
        v = self.vocab
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(v.tokens)
        w.add_token_scores(v.scores)
        w.add_token_types(v.types)
        w.add_bos_token_id(v.bos)
        w.add_eos_token_id(v.eos)
        w.add_unk_token_id(v.unk)
        if v.pad is not None:
            w.add_pad_token_id(v.pad)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(v.add_space_prefix)
        del gguf

    def extra_tensors(self) -> dict[str, np.ndarray]:
        return {}

    def tensor(self, name: str, t: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """HF tensor -> [(gguf name, data)] (empty: dropped)."""
        raise NotImplementedError

    @staticmethod
    def layer_name(name: str, table: dict[str, str]) -> str:
        if not name.startswith("model.layers."):
            return table[name]
        _, _, bid, rest = name.split(".", 3)
        return f"blk.{bid}.{table[rest]}"


class LlamaArch(GGUFArch):
    arch = "llama"
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }

    def write_params(self, w) -> None:
        super().write_params(w)
        w.add_vocab_size(self.c.vocab_size)
        c = self.c
        w.add_rope_dimension_count(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @staticmethod
    def pair_rows(t: np.ndarray, n_head: int) -> np.ndarray:
        """HF rotates halves (row j pairs with j + d/2 in each head); llama.cpp's llama rope
        rotates adjacent rows (2j, 2j+1). Reorder each head's rows to j0, j0+d/2, j1, ..."""
        d = t.shape[0] // n_head
        order = np.arange(d).reshape(2, d // 2).T.reshape(-1)
        idx = (np.arange(n_head)[:, None] * d + order[None, :]).reshape(-1)
        return t[idx]

    def tensor(self, name, t):
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = self.pair_rows(t, self.c.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = self.pair_rows(t, self.c.num_key_value_heads)
        return [(self.layer_name(name, self.names), t)]

    def extra_tensors(self):
        """llama3 rope scaling as llama.cpp stores it: one divisor per frequency."""
        rp = self.rope()
        if rp.get("rope_type") != "llama3":
            return {}
        return {"rope_freqs.weight": llama3_rope_factors(
            rp["rope_theta"], self.c.head_dim, rp["factor"], rp["low_freq_factor"],
            rp["high_freq_factor"], rp["original_max_position_embeddings"])}


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float,
                        orig_ctx: int) -> np.ndarray:
    """(dim/2,) float32 divisors: the angle of frequency i at position p is
    p * theta**(-2i/dim) / factors[i]. Wavelengths below orig_ctx/high keep factor 1, above
    orig_ctx/low get `factor`, in between the inverse of a linear blend of 1/factor and 1.
    Computed in float32 torch arithmetic, as the converter does (bit-identical output)."""
    import torch
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return np.asarray(out, dtype=np.float32)


class Gemma3Arch(GGUFArch):
    arch = "gemma3"
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }

    def write_params(self, w) -> None:
        super().write_params(w)
        if self.c.sliding_window:
            w.add_sliding_window(self.c.sliding_window)

    def tensor(self, name, t):
        if name == "lm_head.weight":          # tied: not in the GGUF
            return []
        if name.endswith("norm.weight"):      # Gemma3RMSNorm scales by (1 + w)
            t = t + np.float32(1.0)
        return [(self.layer_name(name, self.names), t)]


_PLAIN = {k: v for k, v in LlamaArch.names.items()}
_QK_NORMS = {"self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight"}


class Qwen2Arch(GGUFArch):
    """Qwen2 (and the base of Qwen3): Llama's names, no row permutation (NeoX rotary)."""
    arch = "qwen2"
    names = _PLAIN

    def tensor(self, name, t):
        return [(self.layer_name(name, self.names), t)]


class Qwen3Arch(Qwen2Arch):
    arch = "qwen3"
    names = _PLAIN | _QK_NORMS


# per-expert tensors as transformers saves them -> the kind of llama.cpp's (E, ...) stack
_EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",   # Qwen3-MoE
                 "w1": "gate", "w3": "up", "w2": "down"}                      # Mixtral


class ExpertStacks:
    """Collects the per-expert matrices of a layer (`mlp.experts.{e}.gate_proj.weight`,
    Mixtral's `block_sparse_moe.experts.{e}.w1.weight`) and yields each kind as one (E, N, K)
    stack once all E are in, as llama.cpp's converter does; the router (`mlp.gate` or
    `block_sparse_moe.gate`) is ffn_gate_inp."""

    def __init__(self, n_experts: int):
        self.n, self.parts = n_experts, {}

    def take(self, name: str, t: np.ndarray) -> list | None:
        """[(gguf name, data)] for an expert tensor (empty until its stack is complete);
        None for any other tensor."""
        f = name.split(".")
        if len(f) < 5 or f[3] not in ("mlp", "block_sparse_moe"):
            return None
        bid = f[2]
        if f[4] == "gate" and f[-1] == "weight" and len(f) == 6:
            return [(f"blk.{bid}.ffn_gate_inp.weight", t)]
        if f[4] != "experts":
            return None
        kind = _EXPERT_PARTS[f[6]]
        got = self.parts.setdefault((bid, kind), {})
        got[int(f[5])] = t
        if len(got) < self.n:
            return []
        return [(f"blk.{bid}.ffn_{kind}_exps.weight", np.stack([got[e] for e in range(self.n)]))]


class Qwen3MoeArch(Qwen3Arch):
    arch = "qwen3moe"

    def write_params(self, w) -> None:
        super().write_params(w)
        w.add_expert_count(self.c.num_experts)
        w.add_expert_used_count(self.c.num_experts_per_tok)
        w.add_expert_feed_forward_length(self.c.moe_intermediate_size)

    def tensor(self, name, t):
        return stacked_experts(self, self.c.num_experts, name, t, super().tensor)


def stacked_experts(arch: GGUFArch, n_experts: int, name: str, t: np.ndarray, plain) -> list:
    """An arch's tensor(): the experts' parts stacked (ExpertStacks), the rest by `plain`."""
    arch.experts = getattr(arch, "experts", None) or ExpertStacks(n_experts)
    out = arch.experts.take(name, t)
    return plain(name, t) if out is None else out


class MixtralArch(LlamaArch):
    def write_params(self, w) -> None:
        super().write_params(w)
        w.add_expert_count(self.c.num_local_experts)
        w.add_expert_used_count(self.c.num_experts_per_tok)

    def tensor(self, name, t):
        return stacked_experts(self, self.c.num_local_experts, name, t, super().tensor)


class Phi3Arch(GGUFArch):
    arch = "phi3"
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    }

    def rope_dim(self) -> int:
        c = self.c
        return int(self.rope().get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads

    def write_params(self, w) -> None:
        """Phi3MiniModel.set_gguf_parameters and its LongRoPE attention factor."""
        c, rp = self.c, self.rope()
        orig = c.original_max_position_embeddings
        w.add_context_length(c.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(self.rope_dim())
        w.add_rope_freq_base(rp["rope_theta"])
        w.add_sliding_window(c.sliding_window or 0)
        scale = c.max_position_embeddings / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig))
                                        if scale > 1.0 else 1.0)

    def extra_tensors(self):
        rp = self.rope()
        return {"rope_factors_long.weight": np.asarray(rp["long_factor"], np.float32),
                "rope_factors_short.weight": np.asarray(rp["short_factor"], np.float32)}

    def tensor(self, name, t):
        return [(self.layer_name(name, self.names), t)]


class Gemma2Arch(Gemma3Arch):
    arch = "gemma2"
    names = {k: v for k, v in Gemma3Arch.names.items() if "q_norm" not in k and "k_norm" not in k}

    def write_params(self, w) -> None:
        """Gemma2Model.set_gguf_parameters: no rotary keys (llama.cpp's default base 10000)."""
        c = self.c
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)


class Olmo2Arch(Qwen2Arch):
    arch = "olmo2"
    names = {k: v for k, v in _PLAIN.items()
             if k not in ("input_layernorm.weight", "post_attention_layernorm.weight")} | _QK_NORMS | {
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


class GraniteArch(LlamaArch):
    arch = "granite"

    def write_params(self, w) -> None:
        super().write_params(w)
        c = self.c
        w.add_attention_scale(c.attention_multiplier)
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_logit_scale(c.logits_scaling)


class SmolLM3Arch(LlamaArch):
    arch = "smollm3"


ARCHES: dict[str, type[GGUFArch]] = {
    "llama": LlamaArch, "gemma3_text": Gemma3Arch, "qwen2": Qwen2Arch, "qwen3": Qwen3Arch,
    "qwen3_moe": Qwen3MoeArch, "mixtral": MixtralArch, "phi3": Phi3Arch, "gemma2": Gemma2Arch,
    "olmo2": Olmo2Arch, "granite": GraniteArch, "smollm3": SmolLM3Arch,
}

# family vocabularies, by HF model_type
_VOCABS: dict[str, Callable[[int], Vocab]] = {
    "llama": lambda n: make_vocab(
        [("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL)], n,
        bos="<s>", eos="</s>", unk="<unk>", pad=None, add_space_prefix=True),
    # Phi-3's own end token: llama.cpp looks it up in any model named phi3
    "phi3": lambda n: make_vocab(
        [("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL), ("<|endoftext|>", _CONTROL)],
        n, bos="<s>", eos="<|endoftext|>", unk="<unk>", pad=None, add_space_prefix=True),
    **dict.fromkeys(("qwen2", "qwen3", "qwen3_moe", "mixtral", "olmo2", "granite",
                     "smollm3"), lambda n: make_vocab(
        [("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL)], n,
        bos="<s>", eos="</s>", unk="<unk>", pad=None, add_space_prefix=True)),
    "gemma2": lambda n: make_vocab(
        [("<pad>", _CONTROL), ("<eos>", _CONTROL), ("<bos>", _CONTROL), ("<unk>", _UNKNOWN),
         ("<start_of_turn>", _USER_DEFINED), ("<end_of_turn>", _USER_DEFINED)], n,
        bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", add_space_prefix=False),
    "gemma3_text": lambda n: make_vocab(
        [("<pad>", _CONTROL), ("<eos>", _CONTROL), ("<bos>", _CONTROL), ("<unk>", _UNKNOWN),
         ("<start_of_turn>", _USER_DEFINED), ("<end_of_turn>", _USER_DEFINED)], n,
        bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", add_space_prefix=False),
}

GGUF_TYPES = {   # name -> (GGMLQuantizationType name, LlamaFileType name)
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}


def write_gguf(config, vocab: Vocab, tensors: dict[str, np.ndarray], path: Path,
               type_name: str = "f32", name: str = "tiny") -> Path:
    """Write `tensors` (HF names, float32) as a GGUF of `type_name` (a GGUF_TYPES key): every
    `.weight` of 2+ dims except norms in that type (token_embd and output too, as the
    converter's --outtype does), the rest F32."""
    import gguf
    from gguf.quants import quantize
    qname, ftname = GGUF_TYPES[type_name]
    qtype = gguf.GGMLQuantizationType[qname]
    spec = ARCHES[config.model_type](config, vocab)
    w = gguf.GGUFWriter(path, spec.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    spec.write_params(w)
    w.add_file_type(gguf.LlamaFileType[ftname])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    spec.write_vocab(w)
    out = dict(spec.extra_tensors())
    for hf_name, t in tensors.items():
        for gname, data in spec.tensor(hf_name, np.asarray(t, dtype=np.float32)):
            out[gname] = data
    for gname, data in out.items():
        data = np.ascontiguousarray(data, dtype=np.float32)
        if _f32_type(gname, data.ndim) or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
QK_STD = 0.1   # q/k projections: with 0.2 attention scores have std ~5 in the llama models (no
               # q/k norm) and the softmax is so peaked that q8_0 rounding moves logits by 7% rms


def randomize(model, config, seed: int) -> None:
    """Overwrite every parameter from a seeded generator (independent of transformers' init):
    linear weights N(0, 0.2) (q/k projections N(0, QK_STD)), norms 1 + 0.3*N(0, 1) as the
    effective scale, biases N(0, 0.1)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(0.3 * noise if gemma else 1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(QK_STD * noise)
            else:
                p.copy_(0.2 * noise)


@dataclass
class TinyModel:
    family: str
    hf_dir: Path
    ggufs: dict[str, Path]
    config: object
    vocab: Vocab | None = None
    _model: object = field(default=None, repr=False)

    @property
    def bos_id(self) -> int:
        return self.vocab.bos if self.vocab else self.config.bos_token_id

    def hf_model(self):
        if self._model is None:
            self._model = load_hf(self.hf_dir)
        return self._model

    def hf_logits(self, ids: list[int]) -> np.ndarray:
        """(T, vocab) float32 logits from transformers, fp32, eager attention, one forward."""
        return hf_logits(self.hf_model(), ids)

    def hf_logits_rounded(self, ids: list[int], type_name: str = "q8_0") -> np.ndarray:
        """transformers' logits with every weight the GGUF of `type_name` quantizes rounded
        exactly as it is (quantize, dequantize: blocks run along each row, so the converter's
        row permutations commute with it). The reference for a quantized file: what is left
        is arithmetic, not the weights' rounding (which can flip a token's experts)."""
        import torch
        from gguf.quants import dequantize, quantize
        import gguf
        qtype = gguf.GGMLQuantizationType[GGUF_TYPES[type_name][0]]
        model = load_hf(self.hf_dir)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim < 2 or "norm" in name or name.endswith(("mlp.gate.weight",
                                                                  "block_sparse_moe.gate.weight")):
                    continue
                w = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape)))
        return hf_logits(model, ids)


def load_hf(hf_dir: Path, config=None):
    import torch
    from transformers import AutoModelForCausalLM
    kw = {"config": config} if config is not None else {}
    m = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                             attn_implementation="eager", local_files_only=True,
                                             **kw)
    return m.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


_CACHE: dict[tuple, TinyModel] = {}


def build(family: str, out_dir: Path, seed: int = 0, types=("f32", "q8_0")) -> TinyModel:
    """Build (or reuse, within this process) the tiny `family` model: out_dir/<family>-s<seed>/
    holds hf/ (config.json, model.safetensors, tokenizer files) and <family>-<type>.gguf."""
    key = (family, seed, tuple(types))
    if key in _CACHE and _CACHE[key].hf_dir.exists():
        return _CACHE[key]
    import torch
    from transformers import AutoModelForCausalLM
    config = FAMILIES[family]()
    vocab = _VOCABS[config.model_type](config.vocab_size)
    root = Path(out_dir) / f"{family}-s{seed}"
    hf_dir = root / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="eager")
    randomize(model, config, seed)
    model.eval()
    model.save_pretrained(str(hf_dir))
    _hf_tokenizer(vocab).save_pretrained(str(hf_dir))
    from safetensors.numpy import load_file
    tensors = load_file(str(hf_dir / "model.safetensors"))
    ggufs = {t: write_gguf(config, vocab, tensors, root / f"{family}-{t}.gguf", t, family)
             for t in types}
    tm = TinyModel(family, hf_dir, ggufs, model.config, vocab, model)
    _CACHE[key] = tm
    return tm


def test_ids(model: TinyModel, n: int = SEQ_LEN, seed: int = 0) -> list[int]:
    """bos, then n-1 seeded ids drawn from the byte and normal tokens (no special tokens)."""
    rng = np.random.default_rng(seed)
    lo = model.vocab.first_plain if model.vocab else 0
    return [model.bos_id] + rng.integers(lo, model.config.vocab_size, n - 1).tolist()


test_ids.__test__ = False   # not a pytest test


# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------
def llamacpp_logits(gguf_path, ids: list[int], n_threads: int = 2) -> np.ndarray:
    """(T, vocab) float32 logits from llama-cpp-python: one batch, F32 K/V cache, all rows."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids)), n_batch=512,
                          n_ubatch=512, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                          n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def converter_dir(download: bool = False) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) from the
    llama-cpp-python sdist cached under $OSTINATO_HOME/sdist/, extracted once. None if the
    sdist is not cached (download=True fetches it with pip, ~77 MB)."""
    home = Path(os.environ.get("OSTINATO_HOME", Path.home() / ".cache" / "ostinato")) / "sdist"
    stem = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    tgz = home / f"{stem}.tar.gz"
    src = home / stem / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    if not tgz.exists():
        if not download:
            return None
        import subprocess
        import sys
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(home)],
                       check=True)
    want = (f"{stem}/vendor/llama.cpp/convert_hf_to_gguf.py",
            f"{stem}/vendor/llama.cpp/conversion/", f"{stem}/vendor/llama.cpp/gguf-py/")
    with tarfile.open(tgz) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(want) and m.isfile()]
        tf.extractall(home, members=members, filter="data")
    return src


_CONVERT_DRIVER = r"""
import json, sys
from pathlib import Path
conv = Path(sys.argv[1])
sys.path[:0] = [str(conv), str(conv / "gguf-py")]
import torch
import gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
for hf_dir, outtype, outfile in json.loads(sys.argv[2]):
    hparams = ModelBase.load_hparams(Path(hf_dir), False)
    cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    cls.set_vocab = lambda self: None     # our tokenizer is not the converter's business
    with torch.inference_mode():
        cls(Path(hf_dir), types[outtype], Path(outfile), eager=True).write()
"""


def convert_with_llamacpp(jobs: list[tuple[Path, str, Path]], conv: Path) -> None:
    """Run llama.cpp's converter (its own gguf-py, in a subprocess) on each (hf_dir, outtype,
    outfile), without the vocabulary (set_vocab is skipped: the converter would not recognise
    our tokenizer's pre-tokenizer for Gemma 3). outtype: f32, f16, bf16, q8_0."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, NO_LOCAL_GGUF="1")  # the driver puts gguf-py on sys.path itself
    r = subprocess.run([sys.executable, "-c", _CONVERT_DRIVER, str(conv),
                        json.dumps([[str(a), b, str(c)] for a, b, c in jobs])],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-4000:]}")


def read_gguf(path) -> tuple[dict, dict]:
    """(metadata {key: (type name, value)}, tensors {name: (type name, shape, raw data)})."""
    import gguf
    r = gguf.GGUFReader(str(path))
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        kind = f.types[0].name if f.types else None
        if kind == "ARRAY":
            kind = f"ARRAY[{f.types[1].name}]"
        kv[k] = (kind, f.contents())
    ts = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.array(t.data))
          for t in r.tensors}
    return kv, ts
