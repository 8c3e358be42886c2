"""Attention over a paged KV cache: each sequence reads its keys through its block table.

Each layer's cache is a (K, V) pair of num_blocks blocks of block_size slots, in the layout
and dtype of the ops that read it (`ops.new_kv_cache`). A token's slot is
`block_id * block_size + offset`; the runner gives one slot per scheduled token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqSlice:
    """One sequence's share of a step: its queries are rows q_start:q_start+q_len of the
    batch, and after this step its cache holds context_len tokens (the queries are the
    last q_len of them)."""
    q_start: int
    q_len: int
    context_len: int
    block_tables: list[list[int]]      # per KV-cache group: its block ids


@dataclass
class AttentionMetadata:
    slot_mappings: list[torch.Tensor]  # per KV-cache group: (T,) int64
    seqs: list[SeqSlice]
    tables: list[torch.Tensor]         # per group: (S, max_blocks) int64, padded with 0
    seq_meta: torch.Tensor             # (S, 3) int64 rows of (q_start, q_len, context_len)
    bf16_rows: torch.Tensor | None = None   # (T,) uint8: rows on the bfloat16 tiles (--prompt-bf16)

    @classmethod
    def build(cls, slot_mappings: list[torch.Tensor], seqs: list[SeqSlice]) -> "AttentionMetadata":
        tables = []
        for g in range(len(slot_mappings)):
            width = max(len(s.block_tables[g]) for s in seqs)
            rows = [s.block_tables[g] + [0] * (width - len(s.block_tables[g])) for s in seqs]
            tables.append(torch.tensor(rows, dtype=torch.long))
        meta = torch.tensor([[s.q_start, s.q_len, s.context_len] for s in seqs], dtype=torch.long)
        return cls(slot_mappings, seqs, tables, meta)
