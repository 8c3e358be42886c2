"""Busy neighbours for `ostinato bench --contention N`: N processes, each a plain Python loop
of integer arithmetic (one core each, no threads, not pinned), started before a contended run
and killed after it, so every engine meets the same noise: its step time stretched by the
scheduler, and OpenMP-style barriers waiting on a descheduled thread."""
from __future__ import annotations

import subprocess
import sys
import time

# runs until killed, or until the bench that started it is gone (a bench killed by a signal
# runs no __exit__: its neighbours would spin on and load every later measurement); the
# accumulator keeps the loop from being optimised to nothing
_SPIN = ("import os\nparent = os.getppid()\nx = 1\nwhile os.getppid() == parent:\n"
         "    for _ in range(100000):\n        x = (x * 1103515245 + 12345) % 2147483648\n")


class BusyProcesses:
    """`with BusyProcesses(n):` n spinning processes for the duration of the block."""

    def __init__(self, n: int, python: str = sys.executable):
        if n < 0:
            raise ValueError(f"--contention {n}: the number of busy processes must be >= 0")
        self.n, self.python = n, python
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyProcesses:
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen(
                    [self.python, "-c", _SPIN], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        time.sleep(0.2)                 # let them reach their loop before the run starts
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=10)
        self.procs = []


def side_by_side(quiet: dict, contended: dict,
                 keys=("throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                       "itl_p99_ms")) -> dict:
    """One level's quiet and contended figures, with contended/quiet ratios, ITL p99/p50 of
    each, and the contended ITL p99 over the quiet ITL p50 (issue 17's target: <= 3)."""
    out = {"concurrency": quiet.get("concurrency")}
    for k in keys:
        q, c = quiet.get(k), contended.get(k)
        out[k] = {"quiet": q, "contended": c, "ratio": _div(c, q)}
    out["itl_p99_over_p50"] = {"quiet": _div(quiet.get("itl_p99_ms"), quiet.get("itl_p50_ms")),
                               "contended": _div(contended.get("itl_p99_ms"),
                                                 contended.get("itl_p50_ms"))}
    out["contended_itl_p99_over_quiet_p50"] = _div(contended.get("itl_p99_ms"),
                                                   quiet.get("itl_p50_ms"))
    return out


def _div(a, b) -> float | None:
    return round(a / b, 3) if a and b else None
