"""AsyncEngine: the (not thread-safe) Engine driven by ONE background thread, fed by asyncio.

    aengine = AsyncEngine(llm.engine); aengine.start()
    async for d in aengine.generate(prompt_ids, params, "req-1"):   # d: Delta
        ...

Only the engine thread touches the Engine. Other threads talk to it through an inbox of
commands (add, abort) applied between steps, so an abort takes effect before the next step.
Each request owns an asyncio.Queue on its caller's loop, fed with `call_soon_threadsafe`.
Deltas are immutable snapshots taken on the engine thread: the Sequence keeps changing
under the caller's feet, so no reference to it leaves this thread.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingParams
from .disk_cache import DiskStats
from .engine import Engine
from .sequence import Sequence

log = logging.getLogger("ostinato.engine")
_END = object()          # queue sentinel: every choice of the request has finished
IDLE_TICK_S = 0.25       # while idle, the engine thread wakes this often (Engine.idle_tick)


@dataclass(frozen=True)
class Delta:
    """What one step added to one choice (sequence) of a request."""
    request_id: str
    index: int                          # which of the request's n choices
    text: str                           # new text safe to show (may be "" while held back)
    token_ids: tuple[int, ...]          # tokens added this step
    logprobs: tuple[dict, ...] | None   # one {token_id: Logprob} per token in token_ids
    prompt_logprobs: list | None        # on a choice's first delta only (needs the prefill)
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0          # prompt tokens the prefix cache gave this choice
    cumulative_logprob: float = 0.0     # of all its tokens so far
    embedding: Any = None               # the pooled prompt, when finished (params.pooling)
    num_draft_tokens: int = 0           # speculative draft tokens verified for it, so far
    num_accepted_tokens: int = 0        # of those, tokens kept


@dataclass(frozen=True)
class EngineSnapshot:
    """Scheduler load, refreshed by the engine thread after every step or command batch."""
    running: int = 0                    # requests with a sequence running
    waiting: int = 0                    # requests with a sequence waiting for its first step
    kv_usage: float = 0.0               # fraction of KV blocks held by sequences
    prefix_hit_rate: float | None = None
    prefix_queries: int = 0             # prompt tokens looked up in the prefix cache (monotonic)
    prefix_hits: int = 0                # of those, tokens found there (monotonic)
    preemptions: int = 0                # sequences preempted so far (monotonic)
    # speculative decoding (SpecStats; all 0 when it is off), monotonic
    spec_num_drafts: int = 0            # verified drafts (sequence-steps with a draft)
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()     # kept drafts by position in the draft
    steps: int = 0                      # engine steps so far (monotonic)
    step_seconds: float = 0.0           # the last step's runner.execute time
    step_tokens: int = 0                # the last step's tokens
    disk: DiskStats | None = None       # the prefix cache's disk tier, a copy (None: off)
    disk_bytes: int = 0                 # held in its directory now
    threads: int = 0                    # the thread count steps run on now (0: not governed)
    thread_switches: int = 0            # times the governor changed it (monotonic)


class EngineDead(RuntimeError):
    pass


class FaultInjected(RuntimeError):
    """Raised by the fault-injection test hook (see AsyncEngine.enable_fault_injection)."""


@dataclass
class _Request:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    unfinished: int                     # choices still running
    fault: bool = False                 # the test hook fails its output processing
    started: set[int] = field(default_factory=set)    # choices that have sent tokens

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:            # the caller's loop is closed: nobody is listening
            pass


class AsyncEngine:
    def __init__(self, engine: Engine,
                 on_step: Callable[[EngineSnapshot, int], None] | None = None):
        """on_step(snapshot, batch_size) runs on the engine thread after each loop turn
        (batch_size 0 when no step ran); it must be quick and thread-safe (e.g. metrics)."""
        self.engine, self.on_step = engine, on_step
        self.snapshot = EngineSnapshot()
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []       # guarded by _cv
        self._pending_adds = 0              # adds not yet in the snapshot, guarded by _cv
        self._stopping = False
        self._dead: BaseException | None = None
        self._requests: dict[str, _Request] = {}    # engine thread only
        self._fault_hook = False
        self._thread = threading.Thread(target=self._run, name="ostinato-engine", daemon=True)

    # -- any thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def enable_fault_injection(self) -> None:
        """TEST HOOK, off unless called (the server calls it only when OSTINATO_FAULT_INJECT
        is set at startup): requests generated with fault=True then raise FaultInjected
        inside their own output processing (detokenizing / stop check), which the Engine's
        per-sequence error channel must confine to them. Call before start()."""
        output = self.engine.output
        real_append = output.append

        def append(seq, token):                 # runs on the engine thread, inside step()
            req = self._requests.get(seq.request_id)
            if req is not None and req.fault:
                raise FaultInjected(f"injected fault in the output processing of request "
                                    f"{seq.request_id}")
            return real_append(seq, token)
        output.append = append
        self._fault_hook = True

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def error(self) -> BaseException | None:
        """Why the engine thread died, if it did (then every request fails)."""
        return self._dead

    def num_waiting(self) -> int:
        """Requests accepted but not yet running (inbox + scheduler queue)."""
        with self._cv:
            return self._pending_adds + self.snapshot.waiting

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, cmd: tuple) -> None:
        with self._cv:
            if self._dead is not None or self._stopping:
                raise EngineDead(f"the engine is not running ({self._dead or 'shut down'})")
            self._inbox.append(cmd)
            self._pending_adds += cmd[0] == "add"
            self._cv.notify()

    # -- asyncio side ------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str, fault: bool = False) -> AsyncIterator[Delta]:
        """Yield the request's deltas until all its choices finish. Leaving early (break,
        task cancelled because the client went away) aborts it and frees its KV blocks.
        fault: only with enable_fault_injection(), fail this request on purpose."""
        grammar = None
        if params.structured_outputs is not None:     # compiled here, not on the engine thread
            grammar = await asyncio.to_thread(self.engine.grammars.compile,
                                              params.structured_outputs)
        req = _Request(asyncio.Queue(), asyncio.get_running_loop(), params.n,
                       fault=fault and self._fault_hook)
        self._submit(("add", request_id, list(prompt_ids), params, req, grammar))
        done = False
        try:
            while (item := await req.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    done = True             # the engine already dropped the request
                    raise item
                yield item
            done = True
        finally:
            if not done:
                try:
                    self.abort(request_id)
                except EngineDead:
                    pass

    # -- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine.warm_up()        # kernel scratch, KV pages resident: before any step
            while self._next_commands():
                batch = self._step() if self.engine.has_unfinished() else 0
                self._publish(batch)
        except BaseException as e:          # a bug in this loop: fail everyone, loudly
            log.exception("engine thread died")
            with self._cv:
                self._dead = e
        self._fail_all(self._dead or EngineDead("the engine was shut down"))

    def _next_commands(self) -> bool:
        """Apply the inbox; sleep while there is nothing to do. False: shut down."""
        with self._cv:
            while not (self._inbox or self._stopping or self.engine.has_unfinished()):
                self._cv.wait(IDLE_TICK_S)
                self.engine.idle_tick()          # the thread governor's view of the machine
            if self._stopping:
                return False
            cmds, self._inbox = self._inbox, []
        for cmd in cmds:
            self._add(*cmd[1:]) if cmd[0] == "add" else self._abort(cmd[1])
        if cmds:    # adds now count as waiting, aborts freed blocks: show it before stepping
            self._publish(0, applied_adds=sum(cmd[0] == "add" for cmd in cmds))
        return True

    def _add(self, request_id: str, prompt_ids, params, req: _Request, grammar) -> None:
        try:
            self.engine.add_request(prompt_ids, params, request_id, grammar)
        except Exception as e:              # e.g. prompt too long: this request only
            req.put(e)
            return
        self._requests[request_id] = req

    def _abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.engine.abort(request_id)

    def _step(self) -> int:
        try:
            deltas = self.engine.step()
        except Exception as e:
            self._fail_step(e)
            return 0
        for d in deltas:
            req = self._requests.get(d.seq.request_id)
            if req is not None and d.error is not None:
                log.error("request %s failed: %r", d.seq.request_id, d.error)
                self._fail_request(d.seq.request_id, d.error)
            elif req is not None:
                self._deliver(req, d.seq, d.text, d.token_ids, d.finished)
        return len(deltas)

    def _deliver(self, req: _Request, seq: Sequence, text: str, token_ids: list[int],
                 finished: bool) -> None:
        if not (token_ids or finished):
            return                          # a prefill chunk: nothing to show yet
        try:
            delta = _snapshot(seq, text, token_ids, finished,
                              first=seq.index not in req.started)
        except Exception as e:              # a bad delta fails its own request only
            self._fail_request(seq.request_id, e)
            return
        if token_ids:
            req.started.add(seq.index)
        req.put(delta)
        if finished:
            req.unfinished -= 1
            if req.unfinished == 0:
                del self._requests[seq.request_id]
                self.engine.pop_finished(seq.request_id)
                req.put(_END)

    def _fail_step(self, e: Exception) -> None:
        """step() itself raised (per-sequence faults come back as SeqDelta.error instead):
        the batch's state is unknown, so every request in flight fails; the server and the
        engine thread go on."""
        log.error("engine step failed: %r", e)
        for rid in list(self._requests):
            self._fail_request(rid, e)

    def _fail_request(self, request_id: str, e: BaseException) -> None:
        req = self._requests.pop(request_id, None)
        self.engine.abort(request_id)
        if req is not None:
            req.put(e if isinstance(e, Exception) else RuntimeError(repr(e)))

    def _fail_all(self, e: BaseException) -> None:
        for rid in list(self._requests):
            req = self._requests.pop(rid)
            req.put(e if isinstance(e, Exception) else EngineDead(repr(e)))
            try:                            # leave the Engine clean for a next owner
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s at shutdown failed", rid)
        with self._cv:                      # adds that never reached the engine
            for cmd in self._inbox:
                if cmd[0] == "add":
                    cmd[4].put(EngineDead("the engine was shut down"))
            self._inbox = []

    def _publish(self, batch: int, applied_adds: int = 0) -> None:
        snap = _engine_snapshot(self.engine)
        with self._cv:      # one swap, so num_waiting() never misses an applied add
            self.snapshot = snap
            self._pending_adds -= applied_adds
        if self.on_step is not None:
            try:
                self.on_step(snap, batch)
            except Exception:               # metrics must never stop the engine
                log.exception("on_step callback failed")


def _snapshot(seq: Sequence, text: str, token_ids: list[int], finished: bool,
              first: bool) -> Delta:
    """An immutable copy of what the caller needs; `first`: the choice's first tokens."""
    n = len(token_ids)
    logprobs = tuple(seq.logprobs[-n:]) if (seq.logprobs is not None and n) else None
    prompt_lps = list(seq.prompt_logprobs) if (first and seq.prompt_logprobs) else None
    return Delta(seq.request_id, seq.index, text, tuple(token_ids), logprobs, prompt_lps,
                 finished, seq.finish_reason if finished else None,
                 seq.stop_reason if finished else None, seq.num_cached_tokens,
                 seq.cumulative_logprob, seq.embedding if finished else None,
                 seq.num_draft_tokens, seq.num_accepted_tokens)


def _engine_snapshot(engine: Engine) -> EngineSnapshot:
    """Read from the scheduler itself, not engine.stats: stats only change when a step runs,
    and aborts free blocks between steps."""
    sched = engine.scheduler
    kv = getattr(sched, "kv", None)
    spec = getattr(engine, "speculator", None)
    st = spec.stats if spec is not None else None
    return EngineSnapshot(
        running=len({s.request_id for s in sched.running}),
        waiting=len({s.request_id for s in sched.waiting}),
        kv_usage=kv.usage() if kv is not None else 0.0,
        prefix_hit_rate=_prefix_hit_rate(engine),
        prefix_queries=getattr(engine.stats, "prefix_cache_queries", 0),
        prefix_hits=getattr(engine.stats, "prefix_cache_hits", 0),
        preemptions=sched.num_preemptions,
        **_last_step(engine.stats),
        spec_num_drafts=st.num_drafts if st else 0,
        spec_num_draft_tokens=st.num_draft_tokens if st else 0,
        spec_num_accepted_tokens=st.num_accepted_tokens if st else 0,
        spec_accepted_per_pos=tuple(st.accepted_per_pos) if st else (),
        **_disk_snapshot(getattr(engine, "disk", None)),
        **_threads_snapshot(getattr(engine, "governor", None)))


def _threads_snapshot(governor) -> dict:
    if governor is None:
        return {}
    return {"threads": governor.current, "thread_switches": governor.switches}


def _disk_snapshot(disk) -> dict:
    if disk is None:
        return {}
    return {"disk": dataclasses.replace(disk.stats), "disk_bytes": disk.num_bytes}


def _last_step(stats) -> dict:
    """EngineStats' step count and its last step's seconds and tokens, if reported."""
    steps = getattr(stats, "steps", 0)
    if not steps or not getattr(stats, "step_seconds", None):
        return {}
    return {"steps": steps, "step_seconds": stats.step_seconds.recent[-1],
            "step_tokens": stats.tokens_per_step.recent[-1]}


def _prefix_hit_rate(engine: Engine) -> float | None:
    """EngineStats.prefix_cache_hit_rate (prompt tokens reused / looked up), if reported."""
    rate = getattr(engine.stats, "prefix_cache_hit_rate", None)
    return None if rate is None else float(rate)
