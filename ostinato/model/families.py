"""Model families as data: what each GGUF `general.architecture` changes in the one decoder
(model/transformer.py). Adding a family that needs no new kind of arithmetic is one entry
here; a new kind of arithmetic is a new field, read by the decoder and refused where unset.
Arithmetic a metadata key switches on for any family (soft-caps, the embedding, residual,
attention and logit multipliers) is read by model/config.py, not listed here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    arch: str
    act: str = "silu"                   # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    rope_neox: bool = False             # rotate halves (NeoX) instead of adjacent pairs
    qk_norm: str = ""                   # RMSNorm of q and k before rotary: "head" (each head,
                                        # Gemma 3, Qwen3) or "all" (the whole projection, OLMo 2)
    pre_norms: bool = True              # norms before attention and the MLP (OLMo 2: none)
    post_norms: bool = False            # norms after attention and after the MLP
    qkv_bias: bool = False              # biases on the q, k and v projections (Qwen2)
    fused_qkv: bool = False             # one `attn_qkv` and one gate|up `ffn_up` tensor (Phi-3)
    embed_scale_sqrt_d: bool = False    # embeddings times sqrt(d_model)
    sliding_pattern: int = 0            # with a window and no pattern in the file: every Nth
                                        # layer is global (0: every layer slides)
    no_rope_every: int = 0              # every Nth layer has no rotary (SmolLM3: 4)
    local_rope_base: float | None = None   # rotary base of sliding layers, if the file lacks it
    rope_scalings: tuple[str, ...] = ("none",)   # rope.scaling.type values implemented
    rope_freqs: bool = False            # a `rope_freqs.weight` tensor divides the frequencies
    long_rope: bool = False             # LongRoPE: `rope_factors_short/long` tensors (Phi-3)
    moe: bool = False                   # routed experts where the file has expert_count > 0
    # block counts of the sizes whose queries scale by 1/sqrt(d_model / heads), not
    # 1/sqrt(head_dim), when the file has no attention.scale (Gemma 2/3 27B, as llama.cpp)
    width_scaled_queries: tuple[int, ...] = ()
    optional_tensors: tuple[str, ...] = ("output.weight",)   # beyond the per-family set


FAMILIES: dict[str, Family] = {
    # Llama 1-3.x, SmolLM, Mistral (a sliding window, where a file has one, on every layer),
    # Mixtral (experts)
    "llama": Family("llama", rope_scalings=("none", "linear"), rope_freqs=True, moe=True,
                    optional_tensors=("output.weight", "rope_freqs.weight")),
    "qwen2": Family("qwen2", rope_neox=True, qkv_bias=True, rope_scalings=("none", "linear")),
    "qwen3": Family("qwen3", rope_neox=True, qk_norm="head", rope_scalings=("none", "linear")),
    "qwen3moe": Family("qwen3moe", rope_neox=True, qk_norm="head", moe=True,
                       rope_scalings=("none", "linear")),
    # Phi-3 / 3.5 / 4-mini: fused projections, LongRoPE where the file has its factors
    "phi3": Family("phi3", rope_neox=True, fused_qkv=True, long_rope=True),
    # Gemma 2: soft-caps, pre and post norms, every other layer slides
    "gemma2": Family("gemma2", act="gelu_tanh", rope_neox=True, post_norms=True,
                     embed_scale_sqrt_d=True, sliding_pattern=2, width_scaled_queries=(46,)),
    # Gemma 3: 5 sliding layers to 1 global; local layers rotate with base 10k, unscaled
    "gemma3": Family("gemma3", act="gelu_tanh", rope_neox=True, qk_norm="head", post_norms=True,
                     embed_scale_sqrt_d=True, sliding_pattern=6, local_rope_base=10_000.0,
                     rope_scalings=("none", "linear"), width_scaled_queries=(62,)),
    # OLMo 2: norms after attention and the MLP only; q/k norms over the whole projection
    "olmo2": Family("olmo2", rope_neox=True, qk_norm="all", pre_norms=False, post_norms=True),
    # Granite: embedding, residual, attention and logit multipliers (generic keys)
    "granite": Family("granite", rope_scalings=("none", "linear")),
    "smollm3": Family("smollm3", no_rope_every=4, rope_scalings=("none", "linear")),
}
