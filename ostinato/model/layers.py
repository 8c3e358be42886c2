"""Rotary position embedding, shared by the model families (pure torch, elementwise)."""
from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               neox: bool) -> torch.Tensor:
    """x: (T, H, D). neox rotates the two halves of D; otherwise adjacent pairs (GGUF llama,
    whose q/k weights were permuted by the converter for that layout)."""
    angles = positions.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)  # (T, D/2)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)           # (T, 1, D/2)
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
