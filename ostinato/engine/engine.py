"""Engine: one step = schedule -> execute -> update -> emit."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

from ..params import SamplingParams
from ..structured import Grammar, GrammarCompiler
from .output_processor import OutputProcessor, SeqDelta
from .disk_cache import DiskKVCache
from .runner import ModelRunner, SamplerState, SeqResult
from .scheduler import Scheduler
from .speculative import Speculator
from .threads import ThreadGovernor
from .sequence import ScheduledSeq, SchedulerOutput, Sequence
from .stats import StepSeries
from .step_log import StepLog, StepRecord

log = logging.getLogger("ostinato.engine")


@dataclass
class EngineStats:
    """Plain numbers, ready for a metrics exporter."""
    steps: int = 0
    batch_sizes: StepSeries = field(default_factory=StepSeries)   # running sequences per step
    tokens_per_step: StepSeries = field(default_factory=StepSeries)
    step_seconds: StepSeries = field(default_factory=StepSeries)  # runner.execute, per step
    preemptions: int = 0
    prefix_cache_queries: int = 0    # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0       # of those, tokens whose KV was reused
    kv_cache_usage: float = 0.0      # fraction of KV blocks in use after the last step
    num_running: int = 0
    num_waiting: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0


class Engine:
    def __init__(self, runner: ModelRunner, output: OutputProcessor, scheduler: Scheduler,
                 max_model_len: int, speculator: Speculator | None = None,
                 disk: DiskKVCache | None = None, governor: ThreadGovernor | None = None,
                 step_log: StepLog | None = None):
        self.runner, self.output, self.scheduler = runner, output, scheduler
        self.step_log = step_log            # a JSON line per step (step_log.py)
        self.speculator = speculator        # draft tokens after each step (speculative.py)
        self.disk = disk                    # the prefix cache's disk tier (disk_cache.py)
        self.governor = governor            # each step's thread count (threads.py)
        self._threads = governor.current if governor is not None else None
        self._idle = True                   # no work left after the last step: a pause follows
        self._switches_logged = 0
        if disk is not None:
            scheduler.kv.track_new_cached()
        self.max_model_len = max_model_len
        self.seqs: dict[str, list[Sequence]] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        # structured output: thread-safe, its vocabulary built on first use
        self.grammars = GrammarCompiler(output.tok, runner.eos_ids, runner.model.cfg.vocab_size)

    def warm_up(self) -> None:
        """Size the kernels' scratch on the calling thread, the one that will run the steps,
        and make the KV caches resident (ModelRunner.warm_up)."""
        self.runner.warm_up()
        if self.speculator is not None:
            self.speculator.warm_up()

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, grammar: Grammar | None = None) -> str:
        """grammar: params.structured_outputs compiled (AsyncEngine compiles it on another
        thread); without it the constraint is compiled here."""
        request_id = request_id or f"req-{next(self._ids)}"
        if params.structured_outputs is not None and grammar is None:
            grammar = self.grammars.compile(params.structured_outputs)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        room = self.max_model_len - len(prompt_ids)
        if room < 0 or (room == 0 and (params.max_tokens or 0) > 0):
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context "
                             f"holds {self.max_model_len}")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs = [self._new_seq(request_id, i, prompt_ids, params, max_tokens)
                for i in range(params.n)]
        for seq in seqs if grammar is not None else ():
            seq.sampler_state = SamplerState(constraint=grammar.new_constraint())
        self.seqs[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def _new_seq(self, request_id, i, prompt_ids, params, max_tokens) -> Sequence:
        if params.n > 1 and params.seed is not None:   # n distinct but reproducible choices
            params = dataclasses.replace(params, seed=params.seed + i)
        seq = Sequence(f"{request_id}/{i}", request_id, i, list(prompt_ids), params, max_tokens,
                       arrival_time=time.monotonic())
        if params.logprobs is not None:
            seq.logprobs = []
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self.output.start(seq)
        return seq

    def step(self) -> list[SeqDelta]:
        if self.disk is not None:
            self._from_disk()
        plan = self.scheduler.schedule()
        if self.disk is not None:
            self._to_disk()
        if not plan.scheduled:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the KV cache is too small for the waiting requests")
            return []
        features = self.scheduler.step_time.features(plan)
        if self.governor is not None:
            if self._idle:                      # the first step after a pause
                self.governor.wake()
                self._log_switch()
            threads = self._pick_threads(any(s.num_new_tokens - len(s.draft) > 1
                                             for s in plan.scheduled))
        predicted = self.scheduler.step_time.predict(*features) \
            if self.governor is not None or self.step_log else 0.0
        record = self._step_record(plan, features, predicted) if self.step_log else None
        t0 = time.perf_counter()
        results = self.runner.execute(plan)
        seconds = time.perf_counter() - t0
        deltas = [self._update_isolated(s, r) for s, r in zip(plan.scheduled, results)]
        self._idle = not self.scheduler.has_unfinished()
        if self._idle and self.governor is not None:
            self.governor.idle()                # it may wake to another machine (threads.py)
        self.scheduler.step_time.add(*features, seconds)   # the latency target's model
        if self.governor is not None:
            self.governor.record(threads, seconds, predicted)
            self._log_switch()
        self._record(plan, seconds)
        if record is not None:
            self._write_step(record, seconds)
        if self.speculator is not None:
            self.speculator.record_step(plan.num_tokens, seconds)
            self.speculator.propose(self.scheduler.running)
        if self.disk is not None:
            self._to_disk()      # the blocks of those that finished: the engine may go idle
        return deltas

    def _step_record(self, plan: SchedulerOutput, features: tuple[int, float, int],
                     predicted: float) -> StepRecord:
        """The step log's record of a plan before it runs (its sequences' token counts
        change when it does); seconds and the queues are filled in after."""
        # a decode row computes only its last token, a generated one (a prompt's 1-token
        # last chunk is a prompt chunk)
        decode = [s.start == s.seq.num_tokens - 1 and s.start >= len(s.seq.prompt_ids)
                  for s in plan.scheduled]
        budget = self.scheduler.budget            # None: no target
        return StepRecord(
            t=time.time(), seconds=0.0, tokens=features[0],
            prompt_tokens=sum(s.num_new_tokens for s, d in zip(plan.scheduled, decode) if not d),
            decode_rows=sum(decode), sampled_rows=features[2], running=0, waiting=0,
            predicted=predicted,
            target=budget.target_seconds if budget is not None and budget.limited else None,
            level=budget.level if budget is not None and budget.auto else None,
            threads=self._threads, burst=budget is not None and budget.burst)

    def _write_step(self, record: StepRecord, seconds: float) -> None:
        """A log that cannot be written (a full disk) is turned off with a warning: the
        requests in flight go on."""
        record.seconds = seconds
        record.running, record.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        try:
            self.step_log.write(record)
        except (OSError, ValueError) as e:
            log.warning("step log %s: writing failed (%s); the log is off from here",
                        self.step_log.path, e)
            self.step_log.close()
            self.step_log = None

    def _log_switch(self) -> None:
        """Fewer threads is a slower path: the log says when and why the count changes."""
        g = self.governor
        if g.switches != self._switches_logged:
            self._switches_logged = g.switches
            fewer = g.current < g.choices[0]
            (log.warning if fewer else log.info)("threads: now %d of %d (%s)", g.current,
                                                 g.choices[0], g.reason)

    def idle_tick(self) -> None:
        """Call now and then (every IDLE_TICK_S or so) while there is no work."""
        if self.governor is not None:
            self.governor.idle_tick()

    def _pick_threads(self, prefill: bool) -> int:
        """The governor's thread count for this step (the kernels' bits do not depend on it);
        `prefill`: the step carries a prompt chunk (more than one token of a sequence that is
        not a draft)."""
        n = self.governor.pick(prefill)
        if n != self._threads:
            self.runner.set_threads(n)
            self._threads = n
        return n

    # -- the disk tier -------------------------------------------------------------------------
    def _from_disk(self) -> None:
        """Before scheduling: the blocks of the prefixes of those who may be admitted now
        that only the disk holds are read into RAM's prefix cache (where the scheduler finds
        them as hits). A block that fails its checks ends that prefix there."""
        sched, kv = self.scheduler, self.scheduler.kv
        seats = sched.max_num_seqs - len(sched.running)
        for seq in itertools.islice(sched.waiting, max(0, seats)):
            keys = kv.lower_tier_blocks(seq, self.disk.contains)
            for (g, h), payload in zip(keys, self.disk.read_many(keys)):
                if payload is None or not kv.fill_block(
                        g, h, lambda b, g=g, p=payload: self._load_block(g, b, p)):
                    break

    def _load_block(self, g: int, block: int, payload: bytes) -> bool:
        self.runner.load_block(g, block, payload)
        return True

    def _to_disk(self) -> None:
        """After scheduling, before the step runs (which may overwrite an evicted block):
        copy the blocks newly registered in the prefix cache to the disk writer."""
        for g, block, h in self.scheduler.kv.take_new_cached():
            if self.disk.wants(g, h):
                self.disk.put(g, h, self.runner.block_payload(g, block))

    def _record(self, plan: SchedulerOutput, seconds: float = 0.0) -> None:
        st, sched = self.stats, self.scheduler
        st.step_seconds.append(seconds)
        st.steps += 1
        st.batch_sizes.append(len(plan.scheduled))
        st.tokens_per_step.append(plan.num_tokens)
        st.preemptions = sched.num_preemptions
        st.prefix_cache_queries = sched.kv.prefix_queries
        st.prefix_cache_hits = sched.kv.prefix_hits
        st.kv_cache_usage = sched.kv.usage()
        st.num_running, st.num_waiting = len(sched.running), len(sched.waiting)

    def _update_isolated(self, s: ScheduledSeq, r: SeqResult) -> SeqDelta:
        """Per-sequence error channel: a fault in one sequence's sampling, detokenizing or
        stop check finishes it with reason "error"; the step and the others go on."""
        error = r.error
        if error is None:
            try:
                return self._update(s, r)
            except Exception as e:
                error = e
        if not s.seq.finished:
            self.scheduler.finish(s.seq, "error")
        return SeqDelta(s.seq, "", [], True, error=error)

    def _update(self, s: ScheduledSeq, r: SeqResult) -> SeqDelta:
        seq = s.seq
        # the cache now holds the real tokens and the draft tokens that were kept
        seq.num_computed_tokens += s.num_new_tokens - len(s.draft) + len(r.more)
        if s.draft and self.speculator is not None:
            self.speculator.record(seq, len(s.draft), len(r.more))
        if r.prompt_logprobs:
            self._add_prompt_logprobs(seq, s.start, r.prompt_logprobs)
        if r.pooled is not None:
            seq.embedding = r.pooled
        if r.token_id is None:
            return SeqDelta(seq, "", [], False)
        if seq.max_tokens == 0:          # scoring only: the prompt's logprobs were the point
            self.scheduler.finish(seq, "length")
            return SeqDelta(seq, "", [], True)
        texts, ids = [], []
        for one in [r, *r.more]:
            seq.cumulative_logprob += one.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(one.top_logprobs)
            text, reason, stop_reason = self.output.append(seq, one.token_id)
            texts.append(text)
            ids.append(one.token_id)
            if reason is not None:
                self._finish(seq, reason, stop_reason)
                break
        text = "".join(texts)
        seq.text += text
        return SeqDelta(seq, text, ids, seq.finished)

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        if self.speculator is not None:
            self.speculator.finished(seq)

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, start: int, entries: list) -> None:
        """entries[j] is for prompt token start+1+j. After a preemption the prompt is computed
        again: keep only entries past those already there."""
        have = len(seq.prompt_logprobs)        # [None] + entries of tokens 1..have-1
        assert have >= start + 1, "prompt logprobs would leave a gap"
        seq.prompt_logprobs.extend(entries[have - start - 1:])

    def abort(self, request_id: str) -> None:
        for seq in self.seqs.pop(request_id, []):
            self.scheduler.abort(seq)
        if self.disk is not None:
            self._to_disk()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def pop_finished(self, request_id: str) -> list[Sequence]:
        return self.seqs.pop(request_id)
