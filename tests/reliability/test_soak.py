"""The CI version of `make soak`: 30 s at 64 concurrent mixed clients against the session
server. Same checks as the long soak, with a lower throughput bar (0.5 x the reference
run instead of 0.8: the CI machine is shared and the run is short), RSS windows of 10 s, and
requests still running 20 s after a phase ends cancelled (reported as cut, like clients that
give up) so that a slow machine cannot stretch the test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_support import MAX_TOKENS

pytestmark = pytest.mark.model
SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def test_soak_30s(rserver, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(SOAK), "--url", rserver.base, "--pid", str(rserver.proc.pid),
           "--duration", "30", "--reference", "6", "--drain", "20", "--concurrency", "64",
           "--max-tokens", str(MAX_TOKENS), "--min-throughput-ratio", "0.5",
           "--json", str(out)]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240)
    assert out.exists(), p.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(json.dumps(summary, indent=1))
    assert summary["checks"] == {"errors": True, "throughput": True, "kv_idle": True,
                                 "nothing_lost": True, "rss": True}, summary
    assert p.returncode == 0
    assert summary["ok"] > 0 and summary["num_errors"] == 0
