"""`ostinato bench` end to end on the real model and a real server, with tiny sizes: the
report holds every figure the issue names and the numbers are consistent with each other
(speed itself is never asserted here: that is what the bench is for)."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

from ostinato.engine.stats import percentile
from ostinato.bench.serving import Request, summarize


def test_percentile_is_nearest_rank():
    xs = list(range(1, 101))
    assert percentile(xs, 50) == 50 and percentile(xs, 99) == 99 and percentile(xs, 100) == 100
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) == 0.0


def test_summarize_throughput_and_cost():
    reqs = [Request(ttft=0.1 * i, e2e=1.0 + i, tokens=10, gaps=[0.01, 0.02]) for i in range(1, 5)]
    row = summarize(reqs, wall=4.0, errors=1, concurrency=4, usd_per_hour=0.36)
    assert row["throughput_tok_s"] == 10.0 and row["output_tokens"] == 40 and row["errors"] == 1
    assert row["usd_per_mtok"] == pytest.approx(0.36 / (10.0 * 3600) * 1e6, rel=1e-3)
    assert row["ttft_p50_ms"] == 200.0 and row["e2e_p99_ms"] == 5000.0
    assert row["itl_p50_ms"] == 10.0 and row["itl_p99_ms"] == 20.0


@pytest.mark.model
def test_bench_latency_and_serving_sweep(smollm_path, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "ostinato", "bench", "--model", str(smollm_path),
           "--prompt-tokens", "16,48", "--decode-tokens", "8", "--repeats", "1", "--batch", "2",
           "--serving", "--concurrency", "1,3", "--serving-max-tokens", "6",
           "--usd-per-hour", "1.0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads((out / "bench.json").read_text())
    lat = fig["latency"]["ostinato"]
    assert set(lat["ttft_s"]) == {"16", "48"} and all(v > 0 for v in lat["ttft_s"].values())
    assert lat["decode_tok_s"] > 0 and 0 < lat["itl_p50_ms"] <= lat["itl_p99_ms"]
    assert fig["batched_tok_s"] > 0
    shares = fig["batched_time_shares"]       # the plan's stages, then the rest: the whole run
    assert {"attention", "gate_up", "qkv"} <= shares.keys() and all(v >= 0 for v in shares.values())
    assert shares["attention"] > 0 and sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    rows = fig["serving"]["ostinato"]
    assert [row["concurrency"] for row in rows] == [1, 3]
    for row in rows:
        n = max(row["concurrency"], 16)           # a level sends at least 16 requests
        assert row["requests"] == n and row["errors"] == 0 and row["output_tokens"] == 6 * n
        # (the reported throughput is rounded to 0.1 tok/s: on a saturated machine, a few
        # tok/s, that alone is a few % of the cost)
        rounding = 0.05 / row["throughput_tok_s"]
        assert row["usd_per_mtok"] == pytest.approx(1e6 / (row["throughput_tok_s"] * 3600),
                                                    rel=0.01 + rounding)
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"]
    server = fig["servers"]["ostinato"]
    assert server["start_to_first_answer_s"] > 0 and server["peak_rss_mb"] > 100
    md = (out / "bench.md").read_text()
    for needle in ("TTFT, 48-token prompt", "decode (tok/s)", "ITL p99", "$/Mtok", "peak RSS",
                   "| attention |"):
        assert needle in md
    assert (out / "latency.png").stat().st_size > 1000 and (out / "serving.png").stat().st_size > 1000


# -- --contention, Poisson arrivals, mixed prompt lengths ----------------------------------
def test_side_by_side_ratios():
    from ostinato.bench.contention import side_by_side
    quiet = {"concurrency": 16, "throughput_tok_s": 200.0, "ttft_p50_ms": 100.0,
             "ttft_p99_ms": 400.0, "itl_p50_ms": 50.0, "itl_p99_ms": 60.0}
    loud = {"concurrency": 16, "throughput_tok_s": 100.0, "ttft_p50_ms": 300.0,
            "ttft_p99_ms": 900.0, "itl_p50_ms": 80.0, "itl_p99_ms": 200.0}
    r = side_by_side(quiet, loud)
    assert r["concurrency"] == 16
    assert r["throughput_tok_s"] == {"quiet": 200.0, "contended": 100.0, "ratio": 0.5}
    assert r["itl_p99_ms"]["ratio"] == pytest.approx(200 / 60, abs=1e-3)
    assert r["itl_p99_over_p50"] == {"quiet": 1.2, "contended": 2.5}
    assert r["contended_itl_p99_over_quiet_p50"] == 4.0
    assert side_by_side({"itl_p50_ms": 0.0}, {"itl_p50_ms": 1.0}, ("itl_p50_ms",))[
        "itl_p50_ms"]["ratio"] is None


def test_poisson_arrivals_and_mixed_lengths():
    from ostinato.bench.serving import mixed_lengths, poisson_arrivals
    t = poisson_arrivals(2000, 4.0, seed=1)
    assert t == poisson_arrivals(2000, 4.0, seed=1) and t[0] == 0.0
    assert all(b >= a for a, b in zip(t, t[1:]))
    assert (t[-1] - t[0]) / 1999 == pytest.approx(0.25, rel=0.1)      # mean gap 1/rate
    lengths = mixed_lengths(2000, 64, 2048, seed=3)
    assert min(lengths) >= 64 and max(lengths) <= 2048
    # log-uniform: half of them below the geometric mean, sqrt(64 * 2048) = 362
    assert sum(k < 362 for k in lengths) == pytest.approx(1000, rel=0.1)
    with pytest.raises(ValueError, match="request-rate"):
        poisson_arrivals(3, 0.0, seed=1)
    with pytest.raises(ValueError, match="prompt-mix"):
        mixed_lengths(3, 100, 50, seed=1)


def _cpu_seconds(pid: int) -> float:
    import os
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_processes_burn_cpu_and_are_killed():
    import time

    from ostinato.bench.contention import BusyProcesses
    with BusyProcesses(2) as busy:
        assert busy.alive() == 2
        procs = list(busy.procs)
        time.sleep(0.5)
        assert all(_cpu_seconds(p.pid) > 0.1 for p in procs)     # spinning, not sleeping
    assert all(p.poll() is not None for p in procs) and busy.procs == []
    with pytest.raises(ValueError, match="contention"):
        BusyProcesses(-1)


def test_busy_processes_end_with_a_killed_bench():
    """A bench killed by a signal runs no __exit__; its neighbours notice and stop."""
    import os
    import signal
    import subprocess
    import sys
    import time
    code = ("import time\nfrom ostinato.bench.contention import BusyProcesses\n"
            "b = BusyProcesses(1).__enter__()\nprint(b.procs[0].pid, flush=True)\n"
            "time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    spinner = int(bench.stdout.readline())
    time.sleep(0.3)
    assert _cpu_seconds(spinner) > 0.05                     # spinning
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{spinner}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":                                    # exited, not yet reaped
            break
        time.sleep(0.05)
    else:
        os.kill(spinner, signal.SIGKILL)
        raise AssertionError("the busy process outlived its bench")


@pytest.mark.parametrize("args, message", [
    ({"contention": -1}, "contention"),
    ({"contention": 1, "latency": False}, "contention"),
    ({"arrivals": "poisson"}, "request-rate"),
    ({"request_rate": 2.0}, "request-rate"),
    ({"prompt_mix": (64, 2048)}, "--serving"),
])
def test_bench_refuses_bad_combinations(args, message):
    from ostinato.bench import BenchArgs, check_args
    with pytest.raises(ValueError, match=message):
        check_args(BenchArgs(**args))


def test_contention_report_puts_quiet_and_contended_side_by_side():
    from ostinato.bench.contention import side_by_side
    from ostinato.bench.report import markdown
    q = {"concurrency": 4, "throughput_tok_s": 100.0, "ttft_p50_ms": 80.0, "ttft_p99_ms": 90.0,
         "itl_p50_ms": 20.0, "itl_p99_ms": 24.0}
    c = {**q, "throughput_tok_s": 50.0, "itl_p99_ms": 70.0}
    lat = side_by_side({"ttft_16_s": 0.1, "decode_tok_s": 40.0, "itl_p50_ms": 25.0,
                        "itl_p99_ms": 30.0}, {"ttft_16_s": 0.2, "decode_tok_s": 20.0,
                                              "itl_p50_ms": 50.0, "itl_p99_ms": 90.0},
                       ("ttft_16_s", "decode_tok_s", "itl_p50_ms", "itl_p99_ms"))
    fig = {"model": "m", "contention": {"processes": 2, "latency": {"ostinato": lat},
                                        "serving": {"ostinato": [side_by_side(q, c)]}}}
    md = markdown(fig)
    assert "## Quiet vs contended (2 busy processes)" in md
    assert "| decode_tok_s | 40.0 / 20.0 (0.50x) |" in md
    assert "| 4 | 100.0 / 50.0 (0.50x) | 80 / 80 (1.00x) | 20.0 / 20.0 (1.00x) | " \
           "24.0 / 70.0 (2.92x) | 1.20 / 3.50 | 3.50 |" in md


@pytest.mark.model
def test_bench_contention_plumbing(smollm_path, tmp_path):
    """The smallest run: batch-1 latency and one serving level (4 requests, Poisson arrivals,
    mixed prompt lengths), each quiet and beside one busy process."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "ostinato", "bench", "--model", str(smollm_path),
           "--prompt-tokens", "16", "--decode-tokens", "4", "--repeats", "1", "--batch", "0",
           "--serving", "--concurrency", "2", "--serving-max-tokens", "4",
           "--requests-per-level", "4", "--contention", "1", "--arrivals", "poisson",
           "--request-rate", "20", "--prompt-mix", "16,64", "--target-itl-ms", "80",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads((out / "bench.json").read_text())
    con = fig["contention"]
    assert con["processes"] == 1 and fig["arrivals"] == "poisson" and fig["prompt_mix"] == [16, 64]
    lat = con["latency"]["ostinato"]
    assert lat["decode_tok_s"]["quiet"] > 0 and lat["decode_tok_s"]["contended"] > 0
    assert lat["ttft_16_s"]["ratio"] > 0
    quiet, loud = fig["serving"]["ostinato"], con["serving_contended"]["ostinato"]
    for row in quiet + loud:
        assert row["concurrency"] == 2 and row["requests"] == 4 and row["errors"] == 0
        assert row["output_tokens"] == 16
    side = con["serving"]["ostinato"][0]
    assert side["throughput_tok_s"]["quiet"] == quiet[0]["throughput_tok_s"]
    assert side["throughput_tok_s"]["contended"] == loud[0]["throughput_tok_s"]
    md = (out / "bench.md").read_text()
    assert "Quiet vs contended (1 busy processes)" in md and "Poisson arrivals at 20/s" in md
    log = (out / "ostinato-server.log").read_text()
    assert "scheduler: step-time target 80 ms" in log


def test_disk_tier_bench_smallest_real_run(smollm_path):
    """Four fresh processes on a short prompt: the restarts read the prompt back and answer
    the cold answer's first token; the report names every variant and the device's rate."""
    from ostinato.bench.disk_tier import VARIANTS, report, run_disk_tier
    fig = run_disk_tier(str(smollm_path), prompt_tokens=160, repeats=1, threads=1,
                        log=lambda m: None)
    assert fig["same_first_token"] and set(fig["ttft_s"]) == set(VARIANTS)
    assert fig["restart, page cache: blocks_read"] == 9       # (160 - 1) // 16 blocks
    assert fig["restart, from disk: blocks_read"] == 9 and fig["disk_read_rate_Bps"] > 0
    text = report(fig)
    assert all(v in text for v in VARIANTS) and "device's sequential read rate" in text


@pytest.mark.parametrize("flags, message", [
    (["--disk-tier", "--vs", "llama.cpp", "--out", "x"], "drop --vs, --out"),
    (["--disk-tier", "--serving"], "drop --serving"),
    (["--disk-tier-tokens", "100"], "--disk-tier-tokens goes with --disk-tier"),
])
def test_disk_tier_bench_refuses_flags_it_would_not_act_on(flags, message):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ostinato", "bench", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_a_repeated_level_sends_prompts_of_its_own(monkeypatch, tmp_path):
    """`--concurrency 16,16`: the second 16-stream level must not find the first's prompts in
    the prefix cache (its TTFT p50 was 111 ms against 562 ms); a level that is not repeated
    keeps its prompts from run to run, and a contended level has its own."""
    import ostinato.bench as bench
    from ostinato.bench import serving
    salts = []
    monkeypatch.setattr(serving, "warm_up", lambda *a: None)
    monkeypatch.setattr(bench, "_level", lambda llm, a, started, label, base, model, c,
                        salt=0: salts.append((c, salt)) or {"concurrency": c})
    monkeypatch.setattr(bench, "BusyProcesses", lambda n: contextlib.nullcontext())
    args = bench.BenchArgs(serving=True, concurrency=(2, 2, 4, 2), url="http://127.0.0.1:9",
                           contention=1)
    bench._serving(None, args, tmp_path)
    quiet, loud = salts[0::2], salts[1::2]
    assert [c for c, _ in quiet] == [2, 2, 4, 2]
    assert quiet[0][1] == 0 and quiet[2][1] == 0                  # first of their streams
    assert len({s for c, s in quiet if c == 2}) == 3              # each repeat: new prompts
    assert all(ls != qs and lc == qc for (qc, qs), (lc, ls) in zip(quiet, loud))
