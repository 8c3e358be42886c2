"""A line of JSON per engine step (`ostinato serve --step-log FILE`, `LLM(step_log=...)`):
what the scheduler asked of the step and what it took. /metrics' histograms tell how many
steps were slow; this tells which ones and why (a step's prompt tokens, its decode rows, the
target the step-time rule set, auto's demand level, the thread count), which is what the
inter-token p99 of a run is made of. Pure Python, no torch; `summarize` reads a log back.

One record a step, appended and flushed as a whole line (a crash leaves every finished
step's line):
    t               wall clock at the step's start (Unix seconds)
    seconds         how long the step took
    tokens          tokens computed (prompt chunks + decode rows + drafts)
    prompt_tokens   of those, in prompt chunks (a recomputation after a preemption counts)
    decode_rows     sequences computing only their last token, a generated one (and its
                    draft)
    sampled_rows    sequences that sample a token this step
    running, waiting  the scheduler's queues after the step
    predicted       the step-time model's prediction for this step, before it ran
    target          the step's time target (None: no time limit this step: no target, or
                    nobody decoding, or the step-time model not fitted yet)
    level           auto's demand level the target was set with (None unless auto)
    threads         the thread count the step ran on (None: fixed threads)
    burst           its decode rows all came with the queue: auto's target was the longer
                    of the rule and 1.5x the seated step (step_time.py; False in logs from
                    before 2026-12-03)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .stats import percentile


@dataclass
class StepRecord:
    t: float
    seconds: float
    tokens: int
    prompt_tokens: int
    decode_rows: int
    sampled_rows: int
    running: int
    waiting: int
    predicted: float
    target: float | None
    level: float | None
    threads: int | None
    burst: bool = False


class StepLog:
    """Appends StepRecords to `path`, one JSON line each."""

    def __init__(self, path: str | Path):
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise ValueError(f"step log {str(path)!r}: cannot open for appending "
                             f"({e.strerror or e})") from None
        self.path = str(path)

    def write(self, rec: StepRecord) -> None:
        self._f.write(json.dumps(asdict(rec), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def read(path: str | Path) -> list[StepRecord]:
    """The records of a step log: lines that do not parse or lack a field (a torn last line)
    are skipped, fields this version does not know are ignored, a field with a default that
    an older log lacks takes the default."""
    names = [f.name for f in fields(StepRecord)]
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                d = json.loads(line)
                out.append(StepRecord(**{k: d[k] for k in names if k in d}))
            except (ValueError, TypeError, KeyError):
                continue
    return out


def _spread(values: list[float], qs: tuple[int, ...], sep: str = ", ", digits: int = 1) -> str:
    return sep.join(f"p{q} {percentile(values, q):.{digits}f}" for q in qs)


def summarize(records: list[StepRecord]) -> str:
    """Steps with and without prompt chunks beside decode rows: their times, their targets
    and how far they ran over them, and auto's level. The two kinds alternating is what
    spreads the inter-token latency of the decoding streams."""
    lines = []
    with_decode = [r for r in records if r.decode_rows]
    kinds = (("decode rows + prompt chunks", [r for r in with_decode if r.prompt_tokens]),
             ("decode rows only", [r for r in with_decode if not r.prompt_tokens]),
             ("prompt chunks only", [r for r in records if not r.decode_rows]))
    for name, sel in kinds:
        if not sel:
            continue
        ms = [1e3 * r.seconds for r in sel]
        line = f"{name}: {len(sel)} steps, ms {_spread(ms, (10, 50, 90, 99), ' / ')}"
        over = [r.seconds / r.target for r in sel if r.target]
        if over:
            targets = [1e3 * r.target for r in sel if r.target]
            line += (f"; target ms {_spread(targets, (10, 50, 90))}; time / target "
                     f"{_spread(over, (50, 99), digits=2)}")
        lines.append(line)
    if bursts := sum(r.burst for r in records):
        lines.append(f"steps whose decode rows all came with the queue (a burst): {bursts}")
    levels = [1e3 * r.level for r in records if r.level]
    if levels:
        lines.append(f"auto's level ms: {_spread(levels, (10, 50, 90))}, max {max(levels):.1f}")
    threads = sorted({r.threads for r in records if r.threads is not None})
    if threads:
        counts = ", ".join(f"{n}: {sum(r.threads == n for r in records)}" for n in threads)
        lines.append(f"steps by thread count: {counts}")
    return "\n".join(lines) if lines else "no steps"


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m ostinato.engine.step_log",
                                description="Summarize a step log (--step-log FILE).")
    p.add_argument("path")
    print(summarize(read(p.parse_args(argv).path)))


if __name__ == "__main__":
    main()
