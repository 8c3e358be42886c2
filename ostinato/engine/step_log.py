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
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


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
    are skipped, fields this version does not know are ignored."""
    names = [f.name for f in fields(StepRecord)]
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                d = json.loads(line)
                out.append(StepRecord(**{k: d[k] for k in names}))
            except (ValueError, TypeError, KeyError):
                continue
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


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
        line = (f"{name}: {len(sel)} steps, ms p10 {_pct(ms, 10):.1f} / p50 {_pct(ms, 50):.1f} "
                f"/ p90 {_pct(ms, 90):.1f} / p99 {_pct(ms, 99):.1f}")
        over = [r.seconds / r.target for r in sel if r.target]
        if over:
            targets = [1e3 * r.target for r in sel if r.target]
            line += (f"; target ms p50 {_pct(targets, 50):.1f} (p10 {_pct(targets, 10):.1f}, "
                     f"p90 {_pct(targets, 90):.1f}); time / target p50 {_pct(over, 50):.2f}, "
                     f"p99 {_pct(over, 99):.2f}")
        lines.append(line)
    levels = [1e3 * r.level for r in records if r.level]
    if levels:
        lines.append(f"auto's level ms: p10 {_pct(levels, 10):.1f}, p50 {_pct(levels, 50):.1f}, "
                     f"p90 {_pct(levels, 90):.1f}, max {max(levels):.1f}")
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
