"""Rotary position embedding tables, shared by the model families."""
from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, D/2): computed once per step and shared by every layer."""
    angles = positions.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles.cos().contiguous(), angles.sin().contiguous()
