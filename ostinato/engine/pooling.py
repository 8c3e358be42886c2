"""Embeddings: a prompt's final hidden states (after the output norm) pooled per sequence,
step by step as its prompt is computed, in one fixed order of additions (row after row, in
float64), so that neither the batch nor the prefill's chunking changes a bit of the result."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence


@dataclass
class _Pool:
    upto: int                   # prompt rows pooled so far (positions [0, upto))
    acc: torch.Tensor           # (D,) float64: their sum (mean) or the latest row (last)


def pool_rows(seq: Sequence, start: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """Pool this step's rows of seq (hidden: (n_new, D) at positions start..); once the
    prompt's last row is in, return the pooled vector, L2-normalised, as float32 (D,).
    Rows computed again after a preemption are skipped: they are already in."""
    n = len(seq.prompt_ids)
    pool = seq.pooling_state
    if pool is None:
        pool = seq.pooling_state = _Pool(0, torch.zeros(hidden.shape[-1], dtype=torch.float64))
    lo, hi = max(start, pool.upto), min(start + hidden.shape[0], n)
    if lo >= hi:
        return None
    rows = hidden[lo - start: hi - start].double()
    if seq.params.pooling == "mean":
        # cumsum adds row after row: ((acc + r0) + r1) + ..., whatever the chunk boundaries
        pool.acc = torch.cumsum(torch.cat([pool.acc[None], rows]), dim=0)[-1]
    else:
        pool.acc = rows[-1]
    pool.upto = hi
    if hi < n:
        return None
    return _normalise(pool.acc / n if seq.params.pooling == "mean" else pool.acc)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    """Euclidean (L2) normalisation, as llama.cpp's server does by default; a zero vector
    stays zero."""
    norm = torch.sqrt(torch.sum(v * v))
    return (v / norm if norm > 0 else v).float()
