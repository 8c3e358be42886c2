"""`ostinato bench` end to end on the real model and a real server, with tiny sizes: the
report holds every figure the issue names and the numbers are consistent with each other
(speed itself is never asserted here: that is what the bench is for)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ostinato.bench.latency import percentile
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
        n = max(row["concurrency"], 4)
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
