"""Rotary position embedding tables, shared by the model families."""
from __future__ import annotations

import torch

from .config import Rope


def rope_inv_freq(rope: Rope, factors: torch.Tensor | None = None) -> torch.Tensor:
    """(rope.dim/2,) float32: base^(-2i/dim), divided by the linear factor and by the file's
    per-frequency factors (Llama 3's `rope_freqs`, Phi-3's LongRoPE) where the variant has
    them."""
    inv = 1.0 / (rope.base ** (torch.arange(0, rope.dim, 2, dtype=torch.float32) / rope.dim))
    if rope.factor != 1.0:
        inv = inv / rope.factor
    if rope.factors:
        inv = inv / factors.to(torch.float32)
    return inv


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                attn_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, dim/2), times attn_factor: computed once per step and shared by
    every layer."""
    angles = positions.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    cos, sin = angles.cos(), angles.sin()
    if attn_factor != 1.0:
        cos, sin = cos * attn_factor, sin * attn_factor
    return cos.contiguous(), sin.contiguous()
