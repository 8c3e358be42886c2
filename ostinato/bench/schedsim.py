"""A discrete-event simulation of the REAL scheduler (Scheduler, KVCacheManager, StepTimeModel)
under Poisson arrivals, with a synthetic step cost in place of the model, to compare step-time
targets (`--target-itl-ms`) without a machine's noise. Pure Python, no torch, seconds to run.

The cost (SimCost, fitted to SmolLM2 on the 2-core machine: prefill ~2.6 ms a token, a 16-row
decode step ~30 ms): base + per prefill token + per decode row + per thousand attention pairs.
A prefill token costs more than a decode row here, as measured; StepTimeModel's linear features
cannot say so exactly (a row is a token there), so its predictions err as they do on the real
engine. The engine loop is Engine.step's: schedule, run (the cost advances the clock), feed the
step's seconds to StepTimeModel.add, apply the tokens.

    python -m ostinato.bench.schedsim                   # the table of the report
    python -m ostinato.bench.schedsim --streams 16 --rates 0.2,0.4 --requests 100
    python -m ostinato.bench.schedsim --cost 5,0,1.5,0 --rates 0.3,0.5 --policies auto
        # free prefill: what the decode batch's own variation leaves of ITL p99/p50
    python -m ostinato.bench.schedsim --noise 0.2 --policies auto,300
        # a shared machine's step jitter: what no step target removes
    python -m ostinato.bench.schedsim --streams 64 --rates 100000 --requests 64 \
        --prompts 80,80 --policies auto-spread,auto,off --client-cap
        # one burst of 64 requests (the serving sweep's 64-stream level), with and without
        # auto's burst rule (auto-spread: arrivals not stamped)
"""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

from ..engine.kv_cache import KVCacheManager
from ..engine.scheduler import Scheduler
from ..engine.sequence import SchedulerOutput, Sequence
from ..engine.step_time import AutoDemand, LatencyTarget, StepTimeModel, step_features
from ..engine.stats import percentile

BLOCK = 16


class NoDemand(AutoDemand):
    """auto before issue 17: no level, only max(the floor, 1.25 x the decode rows)."""

    def update(self, *args) -> float:
        return self.level           # stays 0


@dataclass(frozen=True)
class SimCost:
    """A step's seconds: base + prefill tokens + decode rows + attention pairs."""
    base: float = 0.006
    prefill_token: float = 0.0022
    decode_row: float = 0.0012
    per_kpair: float = 0.0008        # per thousand (query, key) pairs

    def seconds(self, plan: SchedulerOutput) -> float:
        prefill = sum(s.num_new_tokens for s in plan.scheduled if s.num_new_tokens > 1
                      or s.seq.in_prefill)
        rows = sum(1 for s in plan.scheduled if s.num_new_tokens == 1 and not s.seq.in_prefill)
        pairs = step_features(plan)[1]
        return self.base + self.prefill_token * prefill + self.decode_row * rows + \
            self.per_kpair * pairs / 1e3


@dataclass
class Workload:
    rate: float                      # requests a second (Poisson)
    requests: int = 200
    min_prompt: int = 64
    max_prompt: int = 2048           # log-uniform between the two
    output: int = 128
    seed: int = 0

    def arrivals(self) -> list[tuple[float, int]]:
        rng, t, out = random.Random(self.seed), 0.0, []
        lo, hi = math.log(self.min_prompt), math.log(self.max_prompt)
        for _ in range(self.requests):
            t += rng.expovariate(self.rate)
            n = self.min_prompt if lo == hi else int(math.exp(rng.uniform(lo, hi)))
            out.append((t, n))
        return out


@dataclass
class Result:
    policy: str
    streams: int
    rate: float
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    steps: int
    steady_p50: float        # ITL from steady_from of the arrivals' span to the last arrival
    steady_p99: float
    gaps: list[float] = field(default_factory=list, repr=False)

    @property
    def itl_ratio(self) -> float:
        return self.itl_p99 / self.itl_p50 if self.itl_p50 else math.inf

    @property
    def steady_ratio(self) -> float:
        return self.steady_p99 / self.steady_p50 if self.steady_p50 else math.inf

    def row(self) -> str:
        return (f"| {self.policy} | {self.streams} | {self.rate:g} | {self.tok_s:.1f} | "
                f"{self.ttft_p50:.2f} / {self.ttft_p99:.2f} | {self.itl_p50 * 1e3:.0f} / "
                f"{self.itl_p99 * 1e3:.0f} | {self.itl_ratio:.2f} | {self.steady_p50 * 1e3:.0f} / "
                f"{self.steady_p99 * 1e3:.0f} | {self.steady_ratio:.2f} |")


HEADER = ("| policy | streams | req/s | out tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms | "
          "p99/p50 | steady ITL p50 / p99 ms | p99/p50 |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def simulate(policy: str, streams: int, work: Workload, cost: SimCost = SimCost(),
             budget: int = 512, demand: AutoDemand | None = None,
             steady_from: float = 1 / 3, clients: int | None = None,
             noise: float = 0.0) -> Result:
    """policy: a --target-itl-ms value ("auto", "off", ms), "old-auto" (auto without
    demand: max(the floor, 1.25 x the decode step), the rule before issue 17) or
    "auto-spread" (auto without its burst rule: arrivals not stamped). clients: at
    most that many requests in flight, the rest wait their turn client-side (their TTFT counts
    from arrival), as `ostinato bench --arrivals poisson` sends them; None: every arrival goes
    straight to the scheduler's queue. noise: each step's seconds times a log-normal factor
    of this sigma (a shared machine's jitter; 0: none), drawn from the workload's seed."""
    clients = clients or math.inf
    jitter = random.Random(work.seed + 1)
    arrivals = work.arrivals()
    need = streams * ((work.max_prompt + work.output) // BLOCK + 2) + 2
    kv = KVCacheManager([need], BLOCK, [None], enable_prefix_caching=False)
    unstamped = policy in ("old-auto", "auto-spread")        # auto without the burst rule
    target = LatencyTarget.parse("auto" if unstamped else policy)
    sched = Scheduler(kv, streams, budget, target, StepTimeModel())
    if policy == "old-auto":
        sched.demand = NoDemand()
    elif demand is not None:
        sched.demand = demand
    params = SimpleNamespace(prompt_logprobs=None, pooling=None)
    t, i, steps, done = 0.0, 0, 0, 0
    born, times = {}, {}
    while i < len(arrivals) or sched.has_unfinished():
        if not sched.has_unfinished() and arrivals[i][0] > t:
            t = arrivals[i][0]
        while i < len(arrivals) and arrivals[i][0] <= t and len(born) - done < clients:
            at, n = arrivals[i]
            # distinct ids per request: no prefix-cache hits
            seq = Sequence(f"r{i}", f"r{i}", 0, [i * 4096 + k for k in range(n)], params,
                           work.output, arrival_time=None if unstamped else t)
            born[seq.seq_id], times[seq.seq_id] = at, []
            sched.add(seq)
            i += 1
        plan = sched.schedule()
        seconds = cost.seconds(plan) * (jitter.lognormvariate(0, noise) if noise else 1.0)
        t += seconds
        steps += 1
        sched.step_time.add(*sched.step_time.features(plan), seconds)
        for s in plan.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            if s.samples:
                seq.output_ids.append(1)
                times[seq.seq_id].append(t)
                if len(seq.output_ids) >= seq.max_tokens:
                    sched.finish(seq, "length")
                    done += 1
    ttft = [times[r][0] - born[r] for r in times]
    gaps = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    # steady state: tokens after steady_from of the arrivals' span, before the last arrival
    lo, hi = arrivals[-1][0] * steady_from, arrivals[-1][0]
    steady = [b - a for ts in times.values() for a, b in zip(ts, ts[1:]) if lo <= a <= hi]
    tokens = sum(map(len, times.values()))
    start = min(born.values())
    return Result(policy, streams, work.rate, tokens / (t - start),
                  percentile(ttft, 50), percentile(ttft, 99),
                  percentile(gaps, 50), percentile(gaps, 99), steps,
                  percentile(steady, 50), percentile(steady, 99), gaps)


def capacity(streams: int, work: Workload, cost: SimCost = SimCost()) -> float:
    """Requests a second the engine can serve at most (all streams decoding, prefill in
    whole-budget steps), from the cost model: 1 / (mean prefill + mean decode seconds)."""
    lo, hi = math.log(work.min_prompt), math.log(work.max_prompt)
    n_mean = (work.max_prompt - work.min_prompt) / (hi - lo) if hi > lo else work.min_prompt
    n2_mean = (work.max_prompt ** 2 - work.min_prompt ** 2) / (2 * (hi - lo)) if hi > lo \
        else work.min_prompt ** 2
    prefill = cost.prefill_token * n_mean + cost.per_kpair * n2_mean / 2e3
    ctx = n_mean + work.output / 2
    decode = work.output * (cost.decode_row + cost.per_kpair * ctx / 1e3 + cost.base / streams)
    return 1 / (prefill + decode)


def _cost(value: str) -> SimCost:
    """--cost BASE,TOKEN,ROW,KPAIR in milliseconds, each >= 0."""
    try:
        ms = [float(v) for v in value.split(",")]
    except ValueError:
        ms = []
    if len(ms) != 4 or not all(math.isfinite(v) and v >= 0 for v in ms):
        raise argparse.ArgumentTypeError(f"{value!r}: four numbers of ms >= 0, "
                                         "base,token,row,kpair")
    return SimCost(*(v / 1e3 for v in ms))


def _prompts(value: str) -> tuple[int, int]:
    try:
        lo, hi = map(int, value.split(","))
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{value!r}: LO,HI tokens, 1 <= LO <= HI")
    return lo, hi


def _sigma(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not 0 <= v <= 2:
        raise argparse.ArgumentTypeError(f"{value!r}: a sigma from 0 to 2")
    return v


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="16,64")
    ap.add_argument("--loads", default="0.3,0.7,1.3",
                    help="arrival rates as shares of the cost model's capacity")
    ap.add_argument("--rates", default=None, help="arrival rates in requests a second")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--prompts", type=_prompts, default=(64, 2048), metavar="LO,HI",
                    help="prompt lengths in tokens, log-uniform (default 64,2048)")
    ap.add_argument("--policies", default="old-auto,off,auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--client-cap", action="store_true",
                    help="at most --streams requests in flight, as the bench's clients send "
                         "them (default: every arrival joins the server's queue)")
    ap.add_argument("--cost", type=_cost, default=SimCost(), metavar="BASE,TOKEN,ROW,KPAIR",
                    help="the step cost in ms: a step's base, a prefill token, a decode row, a "
                         "thousand attention pairs (default: SimCost's)")
    ap.add_argument("--noise", type=_sigma, default=0.0, metavar="SIGMA",
                    help="each step's time times a log-normal factor of this sigma: a shared "
                         "machine's jitter (default 0: none)")
    a = ap.parse_args(argv)
    print(HEADER)
    for c in map(int, a.streams.split(",")):
        cap = capacity(c, Workload(1.0, 1, *a.prompts), a.cost)
        rates = [float(r) for r in a.rates.split(",")] if a.rates else \
            [round(cap * float(x), 3) for x in a.loads.split(",")]
        for rate in rates:
            for p in a.policies.split(","):
                w = Workload(rate, a.requests, *a.prompts, seed=a.seed)
                print(simulate(p, c, w, a.cost, clients=c if a.client_cap else None,
                               noise=a.noise).row(), flush=True)
    caps = [f"{c} streams {capacity(c, Workload(1.0, 1, *a.prompts), a.cost):.3f} req/s"
            for c in map(int, a.streams.split(","))]
    print("\ncapacity (cost model): " + ", ".join(caps))


if __name__ == "__main__":
    main()
