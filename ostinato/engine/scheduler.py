"""Continuous-batching scheduler with a token budget per step. Pure Python, no torch.

One rule for prefill and decode alike: a sequence gets
min(num_tokens + len(draft_ids) - num_computed_tokens, budget_left) tokens (draft_ids:
speculative tokens, see speculative.py). Running sequences go first (in
admission order, so decodes come before new prefills), then waiting ones, FCFS, each starting
after its cached prefix. A prompt longer than the budget is prefilled in chunks over several
steps; sequences join and leave the batch at every step.

When a running sequence cannot get blocks, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the waiting queue, keeping
its output tokens. On readmission all of all_ids is recomputed (prefix hits permitting) and
the next token is sampled only once the cache holds every token again.
"""
from __future__ import annotations

from collections import deque

from .kv_cache import KVCacheManager
from .sequence import ScheduledSeq, SchedulerOutput, Sequence, Status


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) must be >= 1")
        self.kv = kv
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out: list[ScheduledSeq] = []
        preempted_before = self.num_preemptions
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        # after a preemption the cache is tight: admitting now would only preempt again
        if self.num_preemptions == preempted_before or not out:
            self._admit_waiting(out, budget)
        return SchedulerOutput(out, self.kv.block_size)

    def _schedule_running(self, out: list[ScheduledSeq], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            item = self._fit_running(self.running[i], budget)
            if item is None:          # it preempted itself: it was the last running one
                break
            out.append(item)
            budget -= item.num_new_tokens
            i += 1
        return budget

    def _fit_running(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        """seq's next chunk, preempting the newest running sequences until its blocks fit.
        Those are always later in `running` than seq, so none was scheduled this step.
        Draft tokens are more tokens to compute, but never worth a preemption: short of
        blocks, the draft is dropped first."""
        start = seq.num_computed_tokens
        n = min(seq.num_tokens + len(seq.draft_ids) - start, budget)
        assert n > 0, f"{seq.seq_id} is running with nothing to compute"
        while (tables := self.kv.allocate(seq, start + n)) is None:
            if seq.draft_ids:
                seq.draft_ids = []
                n = min(seq.num_tokens - start, budget)
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return None
        draft = seq.draft_ids[: max(0, start + n - seq.num_tokens)]
        return ScheduledSeq(seq, n, start, tables, draft)

    def _admit_waiting(self, out: list[ScheduledSeq], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            item = self._fit_waiting(self.waiting[0], budget)
            if item is None:          # FCFS: nobody overtakes the head of the queue
                return
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            if not seq.num_preemptions:
                seq.num_cached_tokens = item.start
            self.running.append(seq)
            out.append(item)
            budget -= item.num_new_tokens

    def _fit_waiting(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        seq.num_computed_tokens = self.kv.find_cached_prefix(seq)
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        tables = self.kv.allocate(seq, seq.num_computed_tokens + n)
        if tables is None:
            seq.num_computed_tokens = 0
            return None
        return ScheduledSeq(seq, n, seq.num_computed_tokens, tables)

    def _preempt(self, seq: Sequence) -> None:
        """Drop seq's KV; it waits at the front and recomputes all_ids when readmitted."""
        assert self.running[-1] is seq
        self.running.pop()
        self.kv.free(seq)        # registers its computed blocks first: they may still hit
        seq.num_computed_tokens = 0
        seq.draft_ids = []
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- leaving ----------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop seq wherever it is (waiting, running or preempted); its blocks are freed."""
        if not seq.finished:
            self.finish(seq, "abort")

    def check_integrity(self) -> None:
        assert all(s.status is Status.RUNNING for s in self.running), "running status"
        assert all(s.status is Status.WAITING for s in self.waiting), "waiting status"
        assert not {id(s) for s in self.running} & {id(s) for s in self.waiting}, "in both"
        assert set(self.kv.seqs) == {s.seq_id for s in self.running}, "blocks of a non-runner"
        self.kv.check_integrity()
