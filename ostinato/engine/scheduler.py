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

With a latency target (step_time.py), the tokens of the step's decode rows (a sequence whose
cache holds all but its last token, plus its drafts) are reserved first; prefill chunks, of
running and then waiting sequences, get what the target leaves of the step's predicted time,
at least a minimum chunk, within max_num_batched_tokens. The engine passes each step's measured
seconds to its model (step_time.add); the scheduler itself reads no clock. With `auto`, after
planning a step that has decode rows the scheduler tells the target's AutoDemand whether the
step carried prefill and whether prefill has fallen behind (the pending prefill, of running
and waiting prompts, would take more than AUTO_BEHIND_S of engine time at this step's prefill
share), and AutoDemand moves the level that the next steps take.
"""
from __future__ import annotations

import itertools
import math
from collections import deque

from .kv_cache import KVCacheManager
from .sequence import ScheduledSeq, SchedulerOutput, Sequence, Status
from .step_time import BURST_WINDOW_S, AutoDemand, LatencyTarget, StepBudget, StepTimeModel


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 target: LatencyTarget | None = None, step_time: StepTimeModel | None = None):
        """target: None keeps the token budget alone; step_time: the fitted step-time model
        (a fresh one by default)."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) must be >= 1")
        self.kv = kv
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # in admission order
        self.num_preemptions = 0
        self.target = target
        self.step_time = step_time or StepTimeModel()
        self._step: StepBudget | None = None     # this step's prefill allowance (a target set)
        self.demand = AutoDemand()               # auto's step-time level (see step_time.py)

    @property
    def budget(self) -> StepBudget | None:
        """The last planned step's prefill allowance (None without a target)."""
        return self._step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out: list[ScheduledSeq] = []
        preempted_before = self.num_preemptions
        self._step = self._step_budget() if self.target is not None else None
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        # after a preemption the cache is tight: admitting now would only preempt again
        if self.num_preemptions == preempted_before or not out:
            self._admit_waiting(out, budget)
        plan = SchedulerOutput(out, self.kv.block_size)
        if self._step is not None and self.target.auto and self._step.limited:
            self._follow_demand(plan)
        return plan

    def _follow_demand(self, plan: SchedulerOutput) -> None:
        """auto: move the level by what this step (it has decode rows) did with prefill."""
        step = self._step
        # the share of a step prefill gets at this target, and the pending prefill it would
        # take longer than behind_s of engine time to clear (counted up to that point)
        share = max(0.0, 1 - step.decode_seconds / step.target_seconds)
        enough, pending = self.demand.behind_s * share, 0.0
        done = {id(s.seq): s.num_new_tokens for s in plan.scheduled}
        for seq in itertools.chain(self.running, self.waiting):
            start = seq.num_computed_tokens + done.get(id(seq), 0)
            if start < len(seq.prompt_ids):
                pending += self.step_time.chunk_seconds(start, seq.num_tokens - start)
                if pending > enough:
                    break
        # the highest: max_ratio x the rule, or a step of the whole token budget
        high = min(self.demand.max_ratio * step.rule_seconds, step.decode_seconds +
                   self.step_time.chunk_seconds(
                       0, max(0, self.max_num_batched_tokens - step.decode_tokens)))
        self.demand.update(step.prefill_tokens > 0, pending > enough, step.rule_seconds, high)

    @staticmethod
    def _decode_tokens(seq: Sequence) -> int:
        """Tokens seq computes as a decode row (its last token and its draft), or 0 if it
        has a prompt (or, after a preemption, more) to prefill."""
        left = seq.num_tokens - seq.num_computed_tokens
        return left + len(seq.draft_ids) if left <= 1 else 0

    def _step_budget(self) -> StepBudget:
        tokens = pairs = rows = 0
        first = math.inf                     # the earliest arrival of a decode row
        for seq in self.running:
            if n := self._decode_tokens(seq):
                tokens, rows = tokens + n, rows + 1
                pairs += self.step_time.pairs(seq.num_computed_tokens, n)
                first = min(first, -math.inf if seq.arrival_time is None else seq.arrival_time)
        seated = self.max_num_seqs - len(self.running)
        queued = list(itertools.islice(self.waiting, max(0, seated)))
        return StepBudget(self.target, self.step_time, tokens, pairs, rows, self.demand.level,
                          (len(queued), sum(self.step_time.pairs(seq.num_tokens - 1, 1)
                                            for seq in queued), len(queued)),
                          burst=self._burst(queued, first))

    def _burst(self, queued: list[Sequence], first: float) -> bool:
        """The decode rows all came with the queue (step_time.py): the whole queue has a
        seat and none of it was preempted (else the rows have had a cadence while it waited),
        and no decode row arrived more than BURST_WINDOW_S before the queue's oldest
        (`first`: the rows' earliest arrival, -inf if one is not known). No row arrived after
        the queue's oldest (FCFS, and a preempted sequence goes back in front), so the window
        needs no upper side."""
        if not queued or len(queued) < len(self.waiting) or \
                any(seq.num_preemptions or seq.arrival_time is None for seq in queued):
            return False
        return first >= min(seq.arrival_time for seq in queued) - BURST_WINDOW_S

    def _schedule_running(self, out: list[ScheduledSeq], budget: int) -> int:
        # with a target, decode rows later in admission order keep their tokens
        reserved = sum(map(self._decode_tokens, self.running)) if self._step else 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            decode = self._decode_tokens(seq) if self._step else 0
            reserved -= decode
            item = self._fit_running(seq, budget - (0 if decode else reserved))
            if item is None and seq not in self.running:    # it preempted itself, the last
                break
            if item is not None:
                out.append(item)
                budget -= item.num_new_tokens
            i += 1
        return budget

    def _prefill_tokens(self, seq: Sequence, start: int, n: int) -> int:
        """n, or less: what the step's time leaves a prefill chunk of seq from `start`."""
        if self._step is None or n <= 0 or seq.num_tokens - start <= 1:
            return n
        return self._step.take(start, n)

    def _fit_running(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        """seq's next chunk, preempting the newest running sequences until its blocks fit.
        Those are always later in `running` than seq, so none was scheduled this step.
        Draft tokens are more tokens to compute, but never worth a preemption: short of
        blocks, the draft is dropped first."""
        start = seq.num_computed_tokens
        assert seq.num_tokens + len(seq.draft_ids) > start, \
            f"{seq.seq_id} is running with nothing to compute"
        n = self._prefill_tokens(seq, start,
                                 min(seq.num_tokens + len(seq.draft_ids) - start, budget))
        if n <= 0:                    # a prefill row the step has no room for
            return None
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
        start = seq.num_computed_tokens
        n = self._prefill_tokens(seq, start, min(seq.num_tokens - start, budget))
        tables = self.kv.allocate(seq, start + n) if n > 0 else None
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
