"""Model families as data: what each GGUF `general.architecture` changes in the one decoder
(model/transformer.py). Adding a family that needs no new kind of arithmetic is one entry
here; a new kind of arithmetic is a new field, read by the decoder and refused where unset."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    arch: str
    act: str = "silu"                   # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    rope_neox: bool = False             # rotate halves (NeoX) instead of adjacent pairs
    qk_norm: bool = False               # RMSNorm of each q and k head before rotary
    post_norms: bool = False            # norms after attention and after the MLP too
    embed_scale_sqrt_d: bool = False    # embeddings times sqrt(d_model)
    sliding_pattern: int = 0            # with a window and no pattern in the file: every Nth
                                        # layer is global (0: every layer slides)
    local_rope_base: float | None = None   # rotary base of sliding layers, if the file lacks it
    rope_scalings: tuple[str, ...] = ("none",)   # rope.scaling.type values implemented
    rope_freqs: bool = False            # a `rope_freqs.weight` tensor divides the frequencies
    optional_tensors: tuple[str, ...] = ("output.weight",)   # beyond the per-family set


FAMILIES: dict[str, Family] = {
    # Llama 1-3.x, SmolLM, Mistral (a sliding window, where a file has one, on every layer)
    "llama": Family("llama", rope_scalings=("none", "linear"), rope_freqs=True,
                    optional_tensors=("output.weight", "rope_freqs.weight")),
    # Gemma 3: 5 sliding layers to 1 global; local layers rotate with base 10k, unscaled
    "gemma3": Family("gemma3", act="gelu_tanh", rope_neox=True, qk_norm=True, post_norms=True,
                     embed_scale_sqrt_d=True, sliding_pattern=6, local_rope_base=10_000.0,
                     rope_scalings=("none", "linear")),
}
