"""KV blocks: a free list and each sequence's block ids. Pure Python, no torch."""
from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.owned: dict[str, list[int]] = {}

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        have = len(self.owned.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self.free)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Make seq_id own enough blocks for num_tokens tokens; returns its block ids."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: {seq_id} needs {need}, {len(self.free)} free")
        blocks = self.owned.setdefault(seq_id, [])
        blocks.extend(self.free.popleft() for _ in range(need))
        return blocks

    def release(self, seq_id: str) -> None:
        self.free.extend(self.owned.pop(seq_id, ()))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def check_integrity(self) -> None:
        used = [b for blocks in self.owned.values() for b in blocks]
        assert len(used) == len(set(used)), "a block is owned twice"
        assert not set(used) & set(self.free), "a block is both owned and free"
        assert len(used) + len(self.free) == self.num_blocks, "blocks were lost"
