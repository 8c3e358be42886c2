"""How many threads each step runs on. Pure Python, no torch; the governor has no clock (its
readers of the machine, running_in_other_processes and CpuElsewhere, are passed in).

A step's kernels fork and join their threads dozens of times; when another process takes one
of the cores, the thread that lost it holds every join up, and a 2-thread step runs 2-4x slower
than a 1-thread step on the core that is left (`bench --contention`). The kernels give the same
bits on any thread count (each output element is computed by one thread in a fixed order), so
the count is free to change from step to step: the governor measures which is faster now.

It runs on the most threads it was given, and now and then runs one step on another count (an
exploration). That step's time, relative to the steps just before and after it on the current
count (each divided by the step-time model's prediction, so a step of another shape compares
fairly), is a ratio; a decayed mean of the log-ratios below 1 / MARGIN switches the count.
An exploration that wins is tried again a few steps later (one fast step is not enough);
explorations that lose grow rarer (EXPLORE_FIRST doubling to EXPLORE_MAX steps apart: a
slower exploration step is one of the rare slow steps the tail latency sees, and more threads
beside a busy neighbour can take 100x longer); two steps in a row on the current count much
slower than usual (a neighbour arrived) bring an exploration of fewer threads at once, and one
step STALL times slower than usual while another thread is runnable moves to fewer threads
outright (beside a neighbour a 2-thread step can take a second: waiting for a second such step
and an exploration to judge it cost 4 streams an inter-token p99 of 2.1 s in `bench
--contention`; a wrong move is undone by the next exploration of more threads). More
threads are tried only while the machine shows about that many idle cores (other processes'
runnable threads, /proc/stat, read every few steps), so a busy neighbour costs no exploration;
fewer are tried only while the current count does not fit (or the load cannot be read), so a
quiet machine costs none either (two slow steps in a row still try fewer, whatever it shows).
When the engine wakes from a pause, the governor looks before the first step: the cores other
processes used during the pause (CpuElsewhere) and their runnable threads now settle the count
for that step, so a neighbour that arrived meanwhile costs no stalled step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

EXPLORE_FIRST = 8          # steps before the first exploration, and after a switch (a
                           # server may start on a busy machine: find out soon)
EXPLORE_MAX = 1024         # explorations that keep losing come at most this rarely
MARGIN = 1.15              # another count must be this much faster to switch to it
CONFIRM = 4                # an exploration that won is tried again this many steps later
JUMP = 1.6                 # two current steps this much slower than usual: try fewer threads
STALL = 4.0                # one current step this much slower, someone else runnable: move
WEIGHT = 0.5               # of the newest exploration in the decayed mean of log-ratios
SHORT_STEP_S = 0.002       # steps shorter than this are too noisy to compare
PROBE_EVERY = 4            # steps between reads of the machine's runnable threads
USUAL_MIN = 3              # current steps the usual time must rest on before one looks slow
DEFER_MAX = 32             # prefill steps in a row an exploration of fewer threads may wait


@dataclass
class _Step:
    threads: int
    ratio: float           # seconds / predicted seconds


def running_elsewhere() -> int | None:
    """Runnable threads on the machine besides the caller (/proc/stat procs_running - 1), or
    None where that cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running "):
                    return max(0, int(line.split()[1]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def running_in_other_processes() -> int | None:
    """Runnable threads of other processes now: /proc/stat's procs_running less this
    process's threads in state R (/proc/self/task); None where that cannot be read. A file a
    thread (about 25 us for a server's threads here), so read every PROBE_EVERY steps and on
    waking, not every step."""
    total = running_elsewhere()
    if total is None:
        return None
    own = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                    own += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
            except (OSError, IndexError):
                pass
    except OSError:
        return None
    return max(0, total + 1 - own)


class CpuElsewhere:
    """The cores other processes kept busy lately (time the hypervisor stole included):
    /proc/stat's busy time of all CPUs less this process's own (/proc/self/stat), since
    mark(). While the engine idles, roll() (every IDLE_TICK_S) moves the mark on, so that a
    long pause is judged by its last fraction of a second, not by whatever ran early in it."""

    MIN_WINDOW_S = 0.1        # shorter: the counters' 10 ms ticks make it noise
    ROLL_S = 0.25             # roll(): a window this old starts anew (the last one is kept)

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.mark()

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        """(busy ticks of all CPUs, this process's ticks), or None where unreadable."""
        try:
            with open("/proc/stat", "rb") as f:
                cpu = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat", "rb") as f:
                own = f.read().rsplit(b")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        if len(cpu) < 8 or len(own) < 13:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = cpu
        return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])

    def mark(self) -> None:
        self._mark, self._before = (self._clock(), self._ticks()), None

    def roll(self) -> None:
        if self._clock() - self._mark[0] >= self.ROLL_S:
            self._before, self._mark = self._mark, (self._clock(), self._ticks())

    def since_mark(self) -> float | None:
        """Cores used elsewhere since the mark (or the one before it, while the mark is too
        recent to tell); None: too short a window, or unreadable."""
        now, ticks = self._clock(), self._ticks()
        start = self._mark if now - self._mark[0] >= self.MIN_WINDOW_S else self._before
        if start is None or start[1] is None or ticks is None:
            return None
        t0, (busy0, own0) = start
        if now - t0 < self.MIN_WINDOW_S:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((ticks[0] - busy0) - (ticks[1] - own0)) / hz / (now - t0))


class ThreadGovernor:
    """probe: runnable threads of other processes now (None: unknown), read every PROBE_EVERY
    steps; cores: the cores this process may use; window: the cores other processes used
    lately (CpuElsewhere: mark, roll, since_mark), read when the engine wakes from a pause."""

    def __init__(self, max_threads: int, probe=None, cores: int | None = None, window=None):
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self._probe = probe if probe is not None else running_in_other_processes
        self._cores = cores if cores is not None else max_threads
        self._window = window if window is not None else CpuElsewhere()
        self._busy: float | None = None           # decayed mean of probe()
        self._probe_countdown = 0
        self.choices = sorted({max_threads, max(1, max_threads // 2), 1}, reverse=True)
        self.current = max_threads
        self.switches = 0
        self.reason = ""                          # why the last switch happened (for the log)
        self._log_gain = {c: 0.0 for c in self.choices}     # decayed mean log(alt / current)
        self._alt_index = 0
        self._interval = EXPLORE_FIRST
        self._countdown = EXPLORE_FIRST
        self._usual: float | None = None          # decayed mean ratio of current steps
        self._usual_n = 0                         # the steps it rests on (since it was reset)
        self._before: _Step | None = None         # the current step before an exploration
        self._explored: _Step | None = None       # waiting for the current step after it
        self._slow = 0                            # current steps in a row much slower than usual
        self._jumped = False                      # so the next exploration tries fewer threads
        self._deferred = 0                        # prefill steps an exploration waited for
        self._recheck = 0                         # a wake moved to fewer: steps until a look

    @property
    def adaptive(self) -> bool:
        return len(self.choices) > 1

    def pick(self, prefill: bool = False) -> int:
        """The thread count for the next step; `prefill`: it carries a prompt chunk.

        A routine exploration of fewer threads waits for a step without one (at most DEFER_MAX
        steps): a prefill step is compute-bound, so one thread of two makes it ~2x slower
        where a decode step is 1.3-1.6x, and it is the longest step besides (the load
        generator of a 64-stream burst looked like a neighbour and two such explorations of
        512-token steps cost 0.56 s of a 13 s run). An exploration after slow steps (a
        neighbour arrived: fewer threads are likely faster) does not wait."""
        if not self.adaptive:
            return self.current
        if self._recheck:                         # the wake's step, then the step after it
            self._recheck -= 1
            return self.current if self._recheck else self._look_again()
        if self._explored is not None or self._countdown > 0:
            return self.current
        if self._jumped:                          # slower than usual: try fewer threads
            self._jumped = False
            return next(c for c in self.choices if c < self.current)
        others = [c for c in self.choices if c != self.current and self._worth_trying(c)]
        if not others:                            # nothing worth a slower step: look again later
            self._countdown = self._interval
            return self.current
        n = others[(self._alt_index + 1) % len(others)]
        if n < self.current and prefill and self._deferred < DEFER_MAX:
            self._deferred += 1                   # the countdown stays at 0: the next step asks
            return self.current
        self._alt_index, self._deferred = (self._alt_index + 1) % len(others), 0
        return n

    def _look_again(self) -> int:
        """The step after a wake moved to fewer threads: if the probe now shows the cores
        free, that step explores the next count up (judged as any exploration is)."""
        now = self._probe()
        up = [c for c in self.choices if c > self.current]
        if now is None or not up or self._cores - now < up[-1] - 0.5:
            return self.current
        self._busy = float(now)
        return up[-1]

    def _worth_trying(self, n: int) -> bool:
        """More threads are tried only while about that many cores look free: beside a busy
        neighbour, a step on more threads than free cores can take 100x longer. Fewer only
        while the current count does not fit: on a quiet machine all the threads are faster,
        and an exploration is one step 1.8x slower for every running stream (Poisson 3/s at
        64 streams here: 7 such steps in 1,000, which is where the inter-token p99 sits). A
        neighbour the probe cannot see (a hypervisor's steal) still slows the steps down,
        and two slow steps in a row try fewer threads whatever the probe says (record).
        Where the load cannot be read, any count is worth a try."""
        if self._busy is None:
            return True
        return self._fits(n) if n > self.current else not self._fits(self.current)

    def _fits(self, n: int) -> bool:
        """n threads fit the cores the others (the probe's decayed mean) leave free."""
        return self._cores - self._busy >= n - 0.5

    def _sample_load(self) -> None:
        self._probe_countdown -= 1
        if self._probe_countdown > 0:
            return
        self._probe_countdown = PROBE_EVERY
        busy = self._probe()
        if busy is not None:
            self._busy = busy if self._busy is None else 0.7 * self._busy + 0.3 * busy

    def idle(self) -> None:
        """The engine has no work left: the machine's use by others is measured from now."""
        if self.adaptive:
            self._window.mark()

    def idle_tick(self) -> None:
        """Now and then while the engine idles: the pause's window rolls on (CpuElsewhere)."""
        if self.adaptive:
            self._window.roll()

    def wake(self) -> None:
        """The first step after the engine was idle (since idle()). A neighbour may have come
        or gone meanwhile, and the first step after a pause (a prefill, often the longest) is
        the one a stall costs most: beside a busy neighbour, a burst's first 2-thread prefill
        took 2.7 s in `bench --contention`. Too few free cores for the current count moves to
        the most that fit, and the next step looks again (recheck): a load generator sending
        a burst's requests looks like a neighbour at this instant, and once it waits for the
        answers the cores show free. More free cores move up to the most that fit (a quiet
        machine, where all the threads are faster: an exploration would have to be judged
        against a step on the old count, and a burst after a warm-up beside its client ran
        its second step on one thread). Free means both now (runnable threads elsewhere, the
        probe) and lately (the cores others used in the last quarter second or so of the
        pause, the window): a thread that merely happens to run at this instant is no
        neighbour, nor is a process that was busy a while ago."""
        if not self.adaptive:
            return
        self._recheck = 0
        now, over_pause = self._probe(), self._window.since_mark()
        if now is None or over_pause is None:
            return
        busy = min(float(now), over_pause)
        self._busy, self._probe_countdown = busy, PROBE_EVERY
        fit = next((c for c in self.choices if self._cores - busy >= c - 0.5), self.choices[-1])
        if fit < self.current:
            self._move_to(fit, f"woke beside {busy:.1f} busy cores elsewhere")
            self._recheck = 2
        elif fit > self.current:
            self._move_to(fit, f"woke with {self._cores - busy:.1f} cores free")
        # the times before the pause are stale, a pending exploration's included
        self._usual, self._usual_n, self._before, self._explored, self._slow = \
            None, 0, None, None, 0

    def record(self, threads: int, seconds: float, predicted: float) -> None:
        """A step ran on `threads` in `seconds`; the step-time model expected `predicted`."""
        if not self.adaptive:
            return
        self._sample_load()
        usable = predicted > 0 and seconds >= SHORT_STEP_S
        if threads != self.current:
            if usable:
                self._explored = _Step(threads, seconds / predicted)
            else:
                self._countdown = self._interval      # nothing to learn from it: later
            return
        if not usable:
            return
        step = _Step(threads, seconds / predicted)
        self._countdown -= 1
        if self._explored is not None:
            self._judge(self._explored, step)
        elif self._usual_n >= USUAL_MIN and step.ratio > JUMP * self._usual:
            if step.ratio > STALL * self._usual and self._stalled_by_neighbour():
                self._move_to(next(c for c in self.choices if c < self.current),
                              f"a step {step.ratio / self._usual:.0f}x slower than usual "
                              f"while another process ran")
                return
            self._slow += 1
            if self._slow >= 2 and self.current > self.choices[-1]:
                # steps on the current count got slower (a neighbour arrived): fewer threads
                # may be faster now; more would only be slower still
                self._countdown, self._interval, self._jumped = 0, EXPLORE_FIRST, True
                self._usual, self._usual_n, self._slow = None, 0, 0   # learn it afresh
                self._before = step               # compare with these steps, not older ones
            return                                # not part of the usual time
        self._slow = 0
        self._usual = step.ratio if self._usual is None else 0.8 * self._usual + 0.2 * step.ratio
        self._usual_n += 1
        self._before = step

    def _stalled_by_neighbour(self) -> bool:
        """A step far slower than usual is a neighbour's doing (not a pause of our own) when
        the machine shows another runnable thread now, or cannot tell."""
        if self.current <= self.choices[-1]:
            return False
        busy = self._probe()
        return busy is None or busy > 0

    def _move_to(self, n: int, why: str) -> None:
        self.current, self.switches, self.reason = n, self.switches + 1, why
        self._log_gain = {c: 0.0 for c in self.choices}
        self._usual, self._usual_n, self._before, self._slow, self._jumped = \
            None, 0, None, 0, False
        self._interval = self._countdown = EXPLORE_FIRST

    def _judge(self, alt: _Step, after: _Step) -> None:
        self._explored = None
        ref = after.ratio if self._before is None else (self._before.ratio + after.ratio) / 2
        g, gain = alt.threads, math.log(alt.ratio / ref)
        self._log_gain[g] = (1 - WEIGHT) * self._log_gain[g] + WEIGHT * gain
        if self._log_gain[g] < -math.log(MARGIN):
            self._move_to(g, f"{g} thread(s) measured {math.exp(-self._log_gain[g]):.2f}x "
                             f"faster")
        elif gain < -math.log(MARGIN):
            self._countdown = CONFIRM             # it won this time: look again soon
            return
        else:
            self._interval = min(EXPLORE_MAX, self._interval * 2)
        self._countdown = self._interval
