"""FCFS scheduler with a token budget per step. Pure Python, no torch.

One rule for prefill and decode alike: a sequence gets
min(num_tokens - num_computed_tokens, budget_left) tokens, running sequences first.
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import ScheduledSeq, SchedulerOutput, Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_groups: int = 1):
        self.blocks, self.num_groups = blocks, num_groups
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        left, out = self.budget, []
        for seq in self.running:
            if left == 0:
                break
            item = self._take(seq, left)
            if item is None:
                break
            out.append(item)
            left -= item.num_new_tokens
        while self.waiting and left > 0 and len(self.running) < self.max_num_seqs:
            item = self._take(self.waiting[0], left)
            if item is None:
                break
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(item)
            left -= item.num_new_tokens
        return SchedulerOutput(out, self.blocks.block_size)

    def _take(self, seq: Sequence, left: int) -> ScheduledSeq | None:
        n = min(seq.num_tokens - seq.num_computed_tokens, left)
        end = seq.num_computed_tokens + n
        if n <= 0 or not self.blocks.can_grow(seq.seq_id, end):
            return None
        block_ids = self.blocks.grow(seq.seq_id, end)
        # interim: every KV group shares one block list (the sliding group frees nothing yet)
        return ScheduledSeq(seq, n, seq.num_computed_tokens, [list(block_ids)] * self.num_groups)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.seq_id)
