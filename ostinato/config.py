"""ModelConfig: the architecture's numbers, read from GGUF metadata."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .loader.gguf import GGUFError

SUPPORTED_ARCHS = ("llama", "gemma3")
# Gemma 3 alternates 5 sliding-window layers with 1 global layer; the GGUF does not store it.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_base_local: float          # sliding-window layers (Gemma 3); == rope_base otherwise
    rope_neox: bool                 # rotate halves (NeoX) instead of adjacent pairs
    sliding_window: int | None      # None: every layer attends to the whole context
    sliding_pattern: int            # every Nth layer is global; 0: no sliding layers
    embed_scale: float              # Gemma multiplies embeddings by sqrt(d_model)
    qk_norm: bool
    post_norms: bool                # Gemma: norms after attention and after the MLP
    act: str                        # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    attn_scale: float

    def kv_group_windows(self) -> list[int | None]:
        """One KV-cache group per distinct attention window: group 0 is full attention,
        group 1 (Gemma 3) the sliding-window layers, whose old blocks can be freed."""
        return [None, self.sliding_window] if self.sliding_pattern and self.sliding_window else [None]

    def layer_kv_group(self, layer: int) -> int:
        return 1 if self.is_sliding(layer) else 0

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window or not self.sliding_pattern:
            return False
        return (layer + 1) % self.sliding_pattern != 0

    @classmethod
    def from_gguf(cls, metadata: dict, path: str = "") -> "ModelConfig":
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise GGUFError(f"{path}: unsupported architecture {arch!r} "
                            f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        m = _Meta(metadata, arch, path)
        d, n_heads = m.int("embedding_length"), m.int("attention.head_count")
        head_dim = m.int("attention.key_length", d // n_heads)
        gemma = arch == "gemma3"
        rope_base = m.float("rope.freq_base", 10_000.0)
        return cls(
            arch=arch, n_layers=m.int("block_count"), d_model=d, n_heads=n_heads,
            n_kv_heads=m.int("attention.head_count_kv", n_heads), head_dim=head_dim,
            ffn_dim=m.int("feed_forward_length"),
            vocab_size=m.vocab_size(),
            context_length=m.int("context_length", 2048),
            rms_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
            rope_base=rope_base,
            rope_base_local=GEMMA3_LOCAL_ROPE_BASE if gemma else rope_base,
            rope_neox=gemma,
            sliding_window=m.int("attention.sliding_window", 0) or None,
            sliding_pattern=GEMMA3_SLIDING_PATTERN if gemma else 0,
            embed_scale=math.sqrt(d) if gemma else 1.0,
            qk_norm=gemma, post_norms=gemma,
            act="gelu_tanh" if gemma else "silu",
            attn_scale=1.0 / math.sqrt(head_dim),
        )


class _Meta:
    def __init__(self, metadata: dict, arch: str, path: str):
        self.md, self.arch, self.path = metadata, arch, path

    def _get(self, key: str, default, kind):
        full = f"{self.arch}.{key}"
        val = self.md.get(full, default)
        if val is None:
            raise GGUFError(f"{self.path}: metadata key {full!r} is missing")
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise GGUFError(f"{self.path}: metadata key {full!r} is not a number: {val!r}")
        val = kind(val)
        if val < 0 or (kind is int and val > 1 << 24):
            raise GGUFError(f"{self.path}: metadata key {full!r} has impossible value {val}")
        return val

    def int(self, key: str, default=None) -> int:
        return self._get(key, default, int)

    def float(self, key: str, default=None) -> float:
        return self._get(key, default, float)

    def vocab_size(self) -> int:
        tokens = self.md.get("tokenizer.ggml.tokens")
        n = len(tokens) if tokens is not None else None
        return self.int("vocab_size", n)
