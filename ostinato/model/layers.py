"""Rotary position embedding tables, shared by the model families."""
from __future__ import annotations

import torch

from .config import Rope


def rope_inv_freq(head_dim: int, rope: Rope, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """(head_dim/2,) float32: base^(-2i/head_dim), divided by the linear factor and by the
    file's per-frequency factors (Llama 3's `rope_freqs`) where the variant uses them."""
    inv = 1.0 / (rope.base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.factor != 1.0:
        inv = inv / rope.factor
    if rope.freq_factors:
        inv = inv / freq_factors.to(torch.float32)
    return inv


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, D/2): computed once per step and shared by every layer."""
    angles = positions.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles.cos().contiguous(), angles.sin().contiguous()
