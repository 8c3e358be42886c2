"""Per-architecture maps from a Hugging Face config.json and tensor names to GGUF: the keys and
names llama.cpp's convert_hf_to_gguf.py writes for each (the contract with ModelConfig, which
then refuses what the decoder does not implement).

config.json is read strictly: every key is read by the architecture's map, or is informative
(_INFO: ids, dtypes, dropout, training-only settings), or holds its neutral value (_NEUTRAL).
Any other key is refused, naming it: it could change the arithmetic (a window, a scaling, a
quantization) and the converter would have dropped it silently.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ModelFileError

_INFO = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "_name_or_path",
    "_from_model_config", "attention_dropout", "embd_pdrop", "resid_pdrop", "hidden_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "router_aux_loss_coef",
    "output_router_logits", "router_jitter_noise", "attention_bias", "mlp_bias",
    "tie_word_embeddings", "_sliding_window_pattern", "unsloth_fixed",
    "vocab_size",       # the tokenizer's rows (hf_tokenizer.py); the embedding's shape decides
    "cache_implementation", "auto_map", "is_llama_config", "transformers.js_config",
    "keys_to_ignore_at_inference", "_model_name_or_path", "unk_token_id",
}
_NEUTRAL = {"pretraining_tp": 1, "use_bidirectional_attention": (False, None), "is_causal": True,
            "use_sliding_window": False, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "rope_scaling": None, "sliding_window": None,
            "layer_types": None, "partial_rotary_factor": 1.0, "rope_interleaved": False}
_ROPE_KEYS = {   # keys a rope dict may hold, by rope_type
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "attention_factor", "extrapolation_factor"},
    "longrope": {"rope_type", "type", "rope_theta", "long_factor", "short_factor",
                 "original_max_position_embeddings", "partial_rotary_factor"},
}


class Cfg:
    """config.json, remembering which keys were read."""

    def __init__(self, config: dict, path: str):
        self.c, self.path, self.read = config, path, set()

    def get(self, key: str, default=None):
        self.read.add(key)
        return self.c.get(key, default)

    def need(self, key: str):
        val = self.get(key)
        if val is None:
            raise ModelFileError(f"{self.path}/config.json: {key!r} is missing")
        return val

    def only(self, key: str, allowed: tuple, what: str) -> None:
        val = self.get(key, allowed[0])
        if val not in allowed:
            raise self.refuse(key, val, what)

    def refuse(self, key: str, val, what: str = "") -> ModelFileError:
        text = repr(val)
        text = text if len(text) <= 80 else text[:77] + "..."
        return ModelFileError(f"{self.path}/config.json: {key!r} = {text} is not implemented by "
                              f"Ostinato{' (' + what + ')' if what else ''}; refusing the folder "
                              f"rather than computing wrong logits")

    def refuse_unread(self) -> None:
        for key, val in self.c.items():
            if key in self.read or key in _INFO:
                continue
            if key in _NEUTRAL and _same(val, _NEUTRAL[key]):
                continue
            raise self.refuse(key, val, "a config.json key Ostinato does not read")


def _same(val, neutral) -> bool:
    if isinstance(neutral, tuple):
        return any(_same(val, n) for n in neutral)
    if neutral is None and isinstance(val, list):     # layer_types: every layer full
        return all(v == "full_attention" for v in val)
    return isinstance(val, bool) == isinstance(neutral, bool) and val == neutral


@dataclass(frozen=True)
class ArchSpec:
    arch: str                                       # GGUF general.architecture
    params: Callable[[Cfg], dict]                   # config.json -> {arch-less key: value}
    layer: dict[str, str]                           # HF name after model.layers.N. -> GGUF
    globals: dict[str, str] = field(default_factory=lambda: dict(_GLOBALS))
    expert_names: dict[str, str] = field(default_factory=lambda: dict(_EXPERTS))
    permute_qk: bool = False                        # Llama's rotary pairs adjacent rows
    norm_shift: bool = False                        # Gemma's norms scale by (1 + w)
    drop_lm_head: bool = False                      # Gemma's output is the embedding, always
    tied_default: bool = False                      # tie_word_embeddings when config lacks it
    extra: Callable[[dict], dict] | None = None     # config -> {GGUF name: float32 values}

    def permuted_heads(self, config: dict, rest: str) -> int:
        """How many heads' rows to reorder for this layer tensor (0: none)."""
        if not self.permute_qk:
            return 0
        if rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            return config["num_attention_heads"]
        if rest in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
            return config.get("num_key_value_heads") or config["num_attention_heads"]
        return 0

    def extra_tensors(self, config: dict) -> dict[str, np.ndarray]:
        return self.extra(config) if self.extra else {}


def gguf_params(spec: ArchSpec, config: dict, path: str) -> dict:
    """The `{arch}.*` GGUF keys for config.json, every key of which is read or refused."""
    c = Cfg(config, path)
    with wrong_values(path):
        params = spec.params(c)
    c.refuse_unread()
    return {f"{spec.arch}.{k}": _as_stored(v) for k, v in params.items() if v is not None}


@contextmanager
def wrong_values(path: str):
    """A config.json value of the wrong type or range (a string for a count, a zero divisor)
    fails the arithmetic that reads it: one line naming the file, not a traceback."""
    try:
        yield
    except ModelFileError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError,
            OverflowError) as e:
        raise ModelFileError(f"{path}/config.json: a value has the wrong type or range "
                             f"({type(e).__name__}: {e})") from None


def _as_stored(v):
    """GGUF stores these floats as float32: read back, they are the float32 values."""
    return float(np.float32(v)) if isinstance(v, float) else v


# ---------------------------------------------------------------------------------------------
# rotary parameters (rope_parameters, or the older rope_scaling + rope_theta)
# ---------------------------------------------------------------------------------------------
def rope_dicts(c: Cfg) -> tuple[dict, dict | None]:
    """(global rope dict, sliding-layer rope dict or None), each with rope_type and rope_theta
    filled in from the top-level keys where the dict lacks them."""
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta")
    if not isinstance(rp, dict):
        raise c.refuse("rope_parameters", rp, "not a dict")
    if "full_attention" in rp or "sliding_attention" in rp:
        extra = set(rp) - {"full_attention", "sliding_attention"}
        if extra:
            raise c.refuse("rope_parameters", sorted(extra), "keys beside the layer kinds")
        glob, local = dict(rp.get("full_attention", {})), rp.get("sliding_attention")
    else:
        glob, local = dict(rp), None
        local_theta = c.get("rope_local_base_freq")
        if local_theta is not None:
            local = {"rope_type": "default", "rope_theta": local_theta}
    for d in (glob, local):
        if d is not None:
            d.setdefault("rope_theta", theta)
            d["rope_type"] = d.get("rope_type", d.get("type")) or "default"
            _check_rope_keys(c, d)
    return glob, (dict(local) if local is not None else None)


def _check_rope_keys(c: Cfg, d: dict) -> None:
    kind = d["rope_type"]
    kind = "longrope" if kind == "su" else kind
    if kind not in _ROPE_KEYS:
        raise c.refuse("rope_parameters", d, f"rope_type {kind!r}")
    extra = set(d) - _ROPE_KEYS[kind] - {"partial_rotary_factor"}
    if extra:
        raise c.refuse("rope_parameters", d, f"keys {sorted(extra)} for rope_type {kind!r}")


def rope_params(c: Cfg, allowed=("default", "linear", "llama3", "yarn")) -> dict:
    """rope.freq_base / freq_base_swa / scaling.* as TextModel.set_gguf_parameters writes them;
    llama3 scaling becomes the `rope_freqs` tensor (llama_rope_freqs)."""
    glob, local = rope_dicts(c)
    kind = glob["rope_type"]
    if glob.get("partial_rotary_factor", 1.0) != 1.0:
        raise c.refuse("rope_parameters", glob, "rotary over part of a head")
    if kind not in allowed:
        raise c.refuse("rope_parameters", glob, f"rope_type {kind!r} for this architecture")
    out = {"rope.freq_base": glob.get("rope_theta")}
    if kind == "linear":
        out |= {"rope.scaling.type": "linear", "rope.scaling.factor": float(glob["factor"])}
    elif kind == "yarn":
        out |= {"rope.scaling.type": "yarn", "rope.scaling.factor": float(glob["factor"]),
                "rope.scaling.original_context_length": glob["original_max_position_embeddings"],
                "rope.scaling.yarn_beta_fast": glob.get("beta_fast"),
                "rope.scaling.yarn_beta_slow": glob.get("beta_slow"),
                "rope.scaling.yarn_ext_factor": glob.get("extrapolation_factor"),
                "rope.scaling.yarn_attn_factor": glob.get("attention_factor")}
    if local is not None:
        if local["rope_type"] != "default":
            raise c.refuse("rope_parameters", local, "scaled rotary on sliding layers")
        out["rope.freq_base_swa"] = local.get("rope_theta")
    return out


def llama_rope_freqs(config: dict) -> dict[str, np.ndarray]:
    """Llama 3.1 scaling as llama.cpp stores it: `rope_freqs`, one divisor per frequency.
    Wavelengths below orig/high keep 1, above orig/low get `factor`, in between the inverse of
    a blend. The frequencies are float32 torch arithmetic, as in the converter (same bits)."""
    c = Cfg(config, "")
    glob, _ = rope_dicts(c)
    if glob["rope_type"] != "llama3":
        return {}
    import torch
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= 1 << 16:
        raise ValueError(f"head_dim {dim!r} is not a positive integer")
    base = glob.get("rope_theta") or 10000.0
    factor, low = glob.get("factor", 8.0), glob.get("low_freq_factor", 1.0)
    high = glob.get("high_freq_factor", 4.0)
    orig = glob.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(float(factor))
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return {"rope_freqs.weight": np.asarray(out, dtype=np.float32)}


# ---------------------------------------------------------------------------------------------
# parameters per architecture
# ---------------------------------------------------------------------------------------------
def base_params(c: Cfg, act=("silu",), rope_allowed=("default", "linear", "yarn")) -> dict:
    """TextModel.set_gguf_parameters' keys for the hparams these families have."""
    c.only("hidden_act", act, "activation")
    n_head = c.need("num_attention_heads")
    head_dim = c.get("head_dim")
    return {
        "block_count": c.need("num_hidden_layers"),
        "context_length": c.get("max_position_embeddings"),
        "embedding_length": c.need("hidden_size"),
        "feed_forward_length": c.need("intermediate_size"),
        "attention.head_count": n_head,
        "attention.head_count_kv": c.get("num_key_value_heads") or n_head,
        "attention.layer_norm_rms_epsilon": c.get("rms_norm_eps"),
        "expert_count": c.get("num_local_experts", c.get("num_experts")),
        "expert_used_count": c.get("num_experts_per_tok"),
        "attention.key_length": head_dim, "attention.value_length": head_dim,
        **rope_params(c, rope_allowed),
    }


def llama_params(c: Cfg) -> dict:
    p = base_params(c, rope_allowed=("default", "linear", "llama3", "yarn"))
    window = c.get("sliding_window")
    used = c.c.get("use_sliding_window", True) is not False     # SmolLM3 says when it is not
    if used and window is not None and window < (c.get("max_position_embeddings") or 0):
        raise c.refuse("sliding_window", window, "llama.cpp's llama architecture has no window")
    head_dim = c.get("head_dim") or p["embedding_length"] // p["attention.head_count"]
    return p | {"vocab_size": c.need("vocab_size"), "rope.dimension_count": head_dim}


def no_window(c: Cfg) -> None:
    """Qwen's sliding_window is only used with use_sliding_window: then refuse it."""
    c.only("use_sliding_window", (False,), "Qwen's sliding-window layers")
    c.get("sliding_window")
    c.get("max_window_layers")


def qwen2_params(c: Cfg) -> dict:
    no_window(c)
    return base_params(c)


def qwen3moe_params(c: Cfg) -> dict:
    no_window(c)
    c.only("norm_topk_prob", (True,), "llama.cpp renormalises the top-k expert weights")
    c.only("decoder_sparse_step", (1,), "dense layers between MoE layers")
    if c.get("mlp_only_layers"):
        raise c.refuse("mlp_only_layers", c.c["mlp_only_layers"], "dense layers")
    return base_params(c) | {"expert_feed_forward_length": c.need("moe_intermediate_size")}


def mixtral_params(c: Cfg) -> dict:
    return llama_params(c)


def granite_params(c: Cfg) -> dict:
    c.get("head_dim")            # the converter ignores it: Granite's heads are d / heads
    c.c = {k: v for k, v in c.c.items() if k != "head_dim"}
    p = llama_params(c)
    return p | {"attention.scale": c.get("attention_multiplier"),
                "embedding_scale": c.get("embedding_multiplier"),
                "residual_scale": c.get("residual_multiplier"),
                "logit_scale": c.get("logits_scaling")}


def smollm3_params(c: Cfg) -> dict:
    """llama.cpp skips rotary on every 4th layer (fixed); other layouts are refused."""
    n = c.need("num_hidden_layers")
    fixed = [int((i + 1) % 4 != 0) for i in range(n)]
    layers = c.get("no_rope_layers")
    if layers is not None and list(layers) != fixed:
        raise c.refuse("no_rope_layers", layers, "llama.cpp skips rotary on every 4th layer")
    c.only("no_rope_layer_interval", (4,), "llama.cpp skips rotary on every 4th layer")
    no_window(c)
    return llama_params(c)


def _window_layers(c: Cfg, period: int) -> None:
    """Gemma's layer_types must be llama.cpp's fixed pattern: every `period`th layer global."""
    n = c.need("num_hidden_layers")
    types = c.get("layer_types")
    want = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    if types is not None and list(types) != want:
        raise c.refuse("layer_types", types, f"llama.cpp makes every {period}th layer global")
    pattern = c.get("sliding_window_pattern")
    if types is None and pattern not in (None, period):
        raise c.refuse("sliding_window_pattern", pattern, f"llama.cpp makes every {period}th "
                       f"layer global")


def _query_scale(c: Cfg, head_dim: int) -> float | None:
    q = c.get("query_pre_attn_scalar")
    return None if q in (None, head_dim) else 1.0 / math.sqrt(q)


def gemma2_params(c: Cfg) -> dict:
    _window_layers(c, 2)
    p = base_params(c, act=(None, "gelu_pytorch_tanh"))
    if p["rope.freq_base"] in (None, 10000.0):    # llama.cpp's default; the converter writes
        del p["rope.freq_base"]                   # none (another theta: written, not dropped)
    c.only("hidden_activation", ("gelu_pytorch_tanh",), "activation")
    return p | {"attn_logit_softcapping": c.get("attn_logit_softcapping"),
                "final_logit_softcapping": c.get("final_logit_softcapping"),
                "attention.sliding_window": c.get("sliding_window"),
                "attention.scale": _query_scale(c, c.need("head_dim"))}


def gemma3_params(c: Cfg) -> dict:
    _window_layers(c, 6)
    c.only("hidden_activation", ("gelu_pytorch_tanh",), "activation")
    p = base_params(c, act=(None, "gelu_pytorch_tanh"))
    if c.get("attn_logit_softcapping") is not None:
        raise c.refuse("attn_logit_softcapping", c.c["attn_logit_softcapping"], "Gemma 3")
    return p | {"final_logit_softcapping": c.get("final_logit_softcapping") or None,
                "attention.sliding_window": c.get("sliding_window"),
                "attention.scale": _query_scale(c, c.need("head_dim"))}


def olmo2_params(c: Cfg) -> dict:
    p = base_params(c)
    if c.get("sliding_window") is None:
        return p
    n = p["block_count"]
    types = c.get("layer_types")
    flags = ([t == "sliding_attention" for t in types] if types is not None
             else [(i + 1) % 4 != 0 for i in range(n)])
    return p | {"attention.sliding_window": c.get("sliding_window"),
                "attention.sliding_window_pattern": flags}


def phi3_params(c: Cfg) -> dict:
    """Phi3MiniModel's own keys: partial rotary, LongRoPE's original context, window 0 for
    none."""
    c.only("hidden_act", ("silu",), "activation")
    glob, _ = rope_dicts(c)
    if glob["rope_type"] not in ("default", "longrope", "su"):
        raise c.refuse("rope_parameters", glob, "Phi-3 rotary")
    d, n_head = c.need("hidden_size"), c.need("num_attention_heads")
    rot = glob.get("partial_rotary_factor", c.get("partial_rotary_factor") or 1.0)
    c.get("original_max_position_embeddings")
    return {
        "context_length": c.get("max_position_embeddings"),
        "rope.scaling.original_context_length": glob.get(
            "original_max_position_embeddings", c.get("original_max_position_embeddings")),
        "embedding_length": d, "feed_forward_length": c.need("intermediate_size"),
        "block_count": c.need("num_hidden_layers"), "attention.head_count": n_head,
        "attention.head_count_kv": c.get("num_key_value_heads") or n_head,
        "attention.layer_norm_rms_epsilon": c.need("rms_norm_eps"),
        "rope.dimension_count": int(rot * d) // n_head, "rope.freq_base": glob["rope_theta"],
        "attention.sliding_window": c.get("sliding_window") or 0,
        **_longrope_attn(glob, c),
    }


def _longrope_attn(glob: dict, c: Cfg) -> dict:
    if not glob.get("long_factor"):
        return {}
    scale = c.get("max_position_embeddings") / glob["original_max_position_embeddings"]
    orig = glob["original_max_position_embeddings"]
    return {"rope.scaling.attn_factor":
            math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0}


def phi3_rope_factors(config: dict) -> dict[str, np.ndarray]:
    glob, _ = rope_dicts(Cfg(config, ""))
    if not glob.get("long_factor"):
        return {}
    return {"rope_factors_long.weight": np.asarray(glob["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.asarray(glob["short_factor"], dtype=np.float32)}


# ---------------------------------------------------------------------------------------------
# tensor names
# ---------------------------------------------------------------------------------------------
_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "w1": "ffn_gate_exps.weight",
            "up_proj": "ffn_up_exps.weight", "w3": "ffn_up_exps.weight",
            "down_proj": "ffn_down_exps.weight", "w2": "ffn_down_exps.weight"}


def _attn(extra: dict | None = None) -> dict:
    names = {}
    for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                   ("o_proj", "attn_output")):
        names[f"self_attn.{hf}.weight"] = f"{gg}.weight"
        names[f"self_attn.{hf}.bias"] = f"{gg}.bias"
    names |= {"self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight",
              "mlp.gate.weight": "ffn_gate_inp.weight",
              "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"}
    return names | (extra or {})


_LLAMA = _attn({"input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "ffn_norm.weight"})
_GEMMA = _attn({"input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
_OLMO2 = _attn({"post_attention_layernorm.weight": "post_attention_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
_PHI3 = _LLAMA | {"self_attn.qkv_proj.weight": "attn_qkv.weight",
                  "mlp.gate_up_proj.weight": "ffn_up.weight"}

_llama = dict(layer=_LLAMA, permute_qk=True, extra=llama_rope_freqs)
ARCHES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", llama_params, **_llama),
    "MistralForCausalLM": ArchSpec("llama", llama_params, **_llama),
    "MixtralForCausalLM": ArchSpec("llama", mixtral_params, **_llama),
    "GraniteForCausalLM": ArchSpec("granite", granite_params, **_llama),
    "SmolLM3ForCausalLM": ArchSpec("smollm3", smollm3_params, **_llama),
    "Qwen2ForCausalLM": ArchSpec("qwen2", qwen2_params, _LLAMA),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qwen2_params, _LLAMA),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", qwen3moe_params, _LLAMA),
    "Phi3ForCausalLM": ArchSpec("phi3", phi3_params, _PHI3, extra=phi3_rope_factors),
    "Gemma2ForCausalLM": ArchSpec("gemma2", gemma2_params, _GEMMA, norm_shift=True,
                                  drop_lm_head=True),
    "Gemma3ForCausalLM": ArchSpec("gemma3", gemma3_params, _GEMMA, norm_shift=True,
                                  drop_lm_head=True),
    "Olmo2ForCausalLM": ArchSpec("olmo2", olmo2_params, _OLMO2),
}
