"""ModelConfig: one model's numbers and its family's switches, read from GGUF metadata.

A family (model/families.py) is data; this file turns a file's metadata into the numbers the
decoder reads. Loading is strict: every `{arch}.*` key is either implemented here or refused
with one line naming the file, the key and its value, because a key we skipped could change
the arithmetic (a rotary scaling, a soft-cap, experts) and give wrong answers with no error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import GGUFError
from .families import FAMILIES, Family


@dataclass(frozen=True)
class Rope:
    """One rotary variant over the first `dim` dimensions of each head: angle(pos, i) =
    pos * inv_freq[i], inv_freq[i] = base^(-2i/dim) / factor, further divided by the file's
    tensor `factors` where set (Llama 3's `rope_freqs`, Phi-3's LongRoPE short or long
    factors); cos and sin are multiplied by attn_factor (LongRoPE's magnitude correction)."""
    base: float
    dim: int
    factor: float = 1.0             # linear scaling (positions / factor); 1.0: none
    factors: str | None = None      # the tensor of per-frequency divisors
    attn_factor: float = 1.0


@dataclass(frozen=True)
class Experts:
    """Routed experts (Mixtral, Qwen3-MoE): a softmax over `count` router logits, the top
    `used` experts, their weights renormalised to sum 1 where `norm`, each expert a gated MLP
    of width ffn_dim."""
    count: int
    used: int
    ffn_dim: int
    norm: bool = True


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    ropes: tuple[Rope, ...]          # the rotary variants; layer i uses ropes[layer_rope[i]]
    layer_rope: tuple[int, ...]      # -1: the layer has no rotary (SmolLM3)
    sliding_window: int | None       # None: every layer attends to the whole context
    layer_sliding: tuple[bool, ...]  # which layers attend within sliding_window
    embed_scale: float               # Gemma: sqrt(d_model); Granite: embedding_multiplier
    attn_scale: float
    attn_softcap: float = 0.0        # scores -> cap * tanh(scores / cap) (Gemma 2); 0: none
    final_softcap: float = 0.0       # the same on the logits
    logit_scale: float = 1.0         # logits are divided by it (Granite)
    residual_scale: float = 1.0      # each block's output is multiplied by it (Granite)
    experts: Experts | None = None   # routed experts instead of one MLP
    long_rope_context: int = 0       # LongRoPE: the long factors apply beyond this context

    def for_context(self, n: int) -> "ModelConfig":
        """This config for an engine of context n: LongRoPE (Phi-3) rotates with its long
        factors where n exceeds the original context, as llama.cpp chooses, else the short."""
        if not self.long_rope_context or n <= self.long_rope_context:
            return self
        ropes = tuple(replace(r, factors="rope_factors_long.weight")
                      if r.factors == "rope_factors_short.weight" else r for r in self.ropes)
        return replace(self, ropes=ropes)

    def kv_group_windows(self) -> list[int | None]:
        """One KV-cache group per distinct attention window: group 0 is full attention,
        group 1 the sliding-window layers, whose old blocks can be freed."""
        return [None, self.sliding_window] if any(self.layer_sliding) else [None]

    def window(self, layer: int) -> int | None:
        """The layer's attention window (None: the whole context)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def layer_windows(self) -> list[int | None]:
        return [self.window(i) for i in range(len(self.layer_sliding))]

    def layer_kv_group(self, layer: int) -> int:
        return 1 if self.is_sliding(layer) else 0

    def is_sliding(self, layer: int) -> bool:
        return self.layer_sliding[layer]

    @classmethod
    def from_gguf(cls, metadata: dict, path: str = "",
                  tensor_names: frozenset[str] | set[str] = frozenset()) -> "ModelConfig":
        """tensor_names: the file's tensors (some switch a feature on, as `rope_freqs`)."""
        arch = metadata.get("general.architecture")
        if arch not in FAMILIES:
            raise GGUFError(f"{path}: unsupported architecture {arch!r} "
                            f"(supported: {', '.join(FAMILIES)})")
        fam, m = FAMILIES[arch], _Meta(metadata, arch, path, tensor_names)
        m.refuse_unknown()
        d, n_heads, n_layers = m.int("embedding_length"), m.int("attention.head_count"), \
            m.int("block_count")
        if n_heads == 0 or n_layers == 0:
            raise GGUFError(f"{path}: {arch}.attention.head_count and {arch}.block_count "
                            f"must be positive")
        head_dim = m.int("attention.key_length", d // n_heads)
        m.require_equal("attention.value_length", head_dim, "value heads of another width")
        sliding = _layer_sliding(m, fam, n_layers)
        ropes, layer_rope = _ropes(m, fam, sliding, head_dim)
        return cls(
            arch=arch, family=fam, n_layers=n_layers, d_model=d, n_heads=n_heads,
            n_kv_heads=m.int("attention.head_count_kv", n_heads), head_dim=head_dim,
            ffn_dim=m.int("feed_forward_length"), vocab_size=m.vocab_size(),
            context_length=m.int("context_length", 2048),
            rms_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
            ropes=ropes, layer_rope=layer_rope,
            sliding_window=m.int("attention.sliding_window", 0) or None if any(sliding) else None,
            layer_sliding=sliding,
            embed_scale=math.sqrt(d) if fam.embed_scale_sqrt_d else m.float("embedding_scale", 1.0),
            attn_scale=m.float("attention.scale", 0.0) or 1.0 / math.sqrt(
                d // n_heads if n_layers in fam.width_scaled_queries else head_dim),
            attn_softcap=m.float("attn_logit_softcapping", 0.0),
            final_softcap=m.float("final_logit_softcapping", 0.0),
            logit_scale=m.positive("logit_scale", 1.0),
            residual_scale=m.float("residual_scale", 1.0),
            experts=_experts(m, fam),
            long_rope_context=(m.int("rope.scaling.original_context_length", 0)
                               if any(r.factors == "rope_factors_short.weight" for r in ropes) else 0),
        )


def _experts(m: "_Meta", fam: Family) -> Experts | None:
    """Routed experts where the file has them: softmax gating (the only kind implemented)."""
    count = m.int("expert_count", 0)
    if not count:
        return None
    if not fam.moe:
        raise GGUFError(f"{m.path}: {m.arch}.expert_count = {count}: experts are not "
                        f"implemented for {m.arch}")
    used = m.int("expert_used_count")
    if not 0 < used <= count:
        raise GGUFError(f"{m.path}: {m.arch}.expert_used_count = {used} must be in 1..{count}")
    gating = m.int("expert_gating_func", 1)
    if gating != 1:
        raise GGUFError(f"{m.path}: {m.arch}.expert_gating_func = {gating} is not implemented "
                        f"(only 1, softmax)")
    norm = m.md.get(f"{m.arch}.expert_weights_norm", True)
    if not isinstance(norm, bool):
        raise GGUFError(f"{m.path}: {m.arch}.expert_weights_norm is not a bool: {_short(norm)}")
    ffn = m.int("expert_feed_forward_length", None) if \
        f"{m.arch}.expert_feed_forward_length" in m.md else m.int("feed_forward_length")
    return Experts(count, used, ffn, bool(norm))


def _layer_sliding(m: "_Meta", fam: Family, n_layers: int) -> tuple[bool, ...]:
    """Which layers slide. The file may say it as a period N (every Nth layer is global, 0:
    none is) or as one flag per layer; else the family's default. No window: none slide."""
    if not m.int("attention.sliding_window", 0):
        return (False,) * n_layers
    pattern = m.md.get(f"{m.arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) or getattr(pattern, "ndim", 0) == 1:      # an array: per layer
        pattern = [v.item() if hasattr(v, "item") else v for v in pattern]
        if len(pattern) != n_layers or not all(v in (0, 1) for v in pattern):
            raise GGUFError(f"{m.path}: {m.arch}.attention.sliding_window_pattern must hold one "
                            f"flag per layer ({n_layers}), got {pattern!r}")
        return tuple(bool(v) for v in pattern)
    period = m.int("attention.sliding_window_pattern", fam.sliding_pattern)
    if period == 0:         # every layer slides (Mistral's way)
        return (True,) * n_layers
    return tuple((i + 1) % period != 0 for i in range(n_layers))


def _ropes(m: "_Meta", fam: Family, sliding: tuple[bool, ...], head_dim: int):
    """The rotary variants and which one each layer uses: global layers take the file's base
    and scaling; sliding layers (Gemma 3) their own base, unscaled; -1 for a layer without
    rotary (SmolLM3: every 4th)."""
    # no type but a factor: linear, as llama.cpp reads it (never a factor silently dropped)
    has_factor = f"{m.arch}.rope.scaling.factor" in m.md
    kind = m.str("rope.scaling.type", "linear" if has_factor else "none")
    if kind not in fam.rope_scalings:
        raise GGUFError(f"{m.path}: {m.arch}.rope.scaling.type {kind!r} is not implemented for "
                        f"{m.arch} (implemented: {', '.join(fam.rope_scalings)})")
    factor = m.float("rope.scaling.factor", 1.0)
    if factor <= 0 or (kind != "linear" and factor != 1.0):
        raise GGUFError(f"{m.path}: {m.arch}.rope.scaling.factor {factor} does not fit rotary "
                        f"scaling type {kind!r}")
    base = m.float("rope.freq_base", 10_000.0)
    dim = m.int("rope.dimension_count", head_dim)
    if dim % 2 or not 0 < dim <= head_dim:
        raise GGUFError(f"{m.path}: {m.arch}.rope.dimension_count = {dim} must be even and in "
                        f"2..{head_dim} (the head dimension)")
    factors = None
    if fam.rope_freqs and m.has_tensor("rope_freqs.weight"):
        factors = "rope_freqs.weight"
    elif fam.long_rope and m.has_tensor("rope_factors_short.weight"):
        factors = "rope_factors_short.weight"
    ropes = [Rope(base, dim, factor, factors, m.positive("rope.scaling.attn_factor", 1.0))]
    layer_rope = [0] * len(sliding)
    if any(sliding):
        ropes.append(Rope(m.float("rope.freq_base_swa", fam.local_rope_base or base), dim))
        layer_rope = [int(s) for s in sliding]
    if fam.no_rope_every:
        layer_rope = [-1 if (i + 1) % fam.no_rope_every == 0 else r
                      for i, r in enumerate(layer_rope)]
    return tuple(ropes), tuple(layer_rope)


# Keys under `{arch}.` that this file implements. Each other key is refused, except where the
# value is the neutral one (then it changes nothing).
_IMPLEMENTED = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "attention.sliding_window_pattern", "attention.scale", "rope.dimension_count",
    "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.attn_factor", "attn_logit_softcapping", "final_logit_softcapping",
    "logit_scale", "residual_scale", "embedding_scale", "expert_count", "expert_used_count",
    "expert_feed_forward_length", "expert_gating_func", "expert_weights_norm",
    # LongRoPE's switch between its factors; else what the model was trained for
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",      # informative, no arithmetic depends on it
}
_NEUTRAL = {"expert_shared_count": 0, "expert_weights_scale": 1.0, "attention.clamp_kqv": 0.0,
            "attention.causal": True, "use_parallel_residual": False}


class _Meta:
    def __init__(self, metadata: dict, arch: str, path: str, tensor_names=frozenset()):
        self.md, self.arch, self.path, self.tensor_names = metadata, arch, path, tensor_names

    def refuse_unknown(self) -> None:
        if (self.md.get("split.count") or 1) != 1:
            raise GGUFError(f"{self.path}: split GGUF files (split.count "
                            f"{self.md['split.count']!r}) are not supported: merge them first")
        prefix = self.arch + "."
        for key, val in self.md.items():
            sub = key[len(prefix):] if key.startswith(prefix) else None
            if sub is None or sub in _IMPLEMENTED:
                continue
            if sub in _NEUTRAL and val == _NEUTRAL[sub] and not isinstance(val, str):
                continue
            raise GGUFError(f"{self.path}: metadata key {key!r} = {_short(val)} is not "
                            f"implemented by Ostinato for {self.arch} (it would change the "
                            f"arithmetic); refusing the file rather than computing wrong logits")

    def require_equal(self, key: str, expected: int, what: str) -> None:
        val = self.int(key, expected)
        if val != expected:
            raise GGUFError(f"{self.path}: {self.arch}.{key} = {val} (not {expected}): "
                            f"{what} is not implemented")

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_names

    def _get(self, key: str, default, kind):
        full = f"{self.arch}.{key}"
        val = self.md.get(full, default)
        if val is None:
            raise GGUFError(f"{self.path}: metadata key {full!r} is missing")
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise GGUFError(f"{self.path}: metadata key {full!r} is not a number: {_short(val)}")
        val = kind(val)
        if not math.isfinite(val) or val < 0 or (kind is int and val > 1 << 24):
            raise GGUFError(f"{self.path}: metadata key {full!r} has impossible value {val}")
        return val

    def int(self, key: str, default=None) -> int:
        return self._get(key, default, int)

    def float(self, key: str, default=None) -> float:
        return self._get(key, default, float)

    def positive(self, key: str, default: float) -> float:
        val = self.float(key, default)
        if val <= 0:
            raise GGUFError(f"{self.path}: metadata key {self.arch}.{key!r} must be positive, "
                            f"got {val}")
        return val

    def str(self, key: str, default: str) -> str:
        val = self.md.get(f"{self.arch}.{key}", default)
        if not isinstance(val, str):
            raise GGUFError(f"{self.path}: metadata key {self.arch}.{key!r} is not a string: "
                            f"{_short(val)}")
        return val

    def vocab_size(self) -> int:
        tokens = self.md.get("tokenizer.ggml.tokens")
        n = len(tokens) if tokens is not None else None
        return self.int("vocab_size", n)


def _short(val) -> str:
    text = repr(val)
    return text if len(text) <= 80 else text[:77] + "..."
