"""`ostinato serve` from the command line: its options, and failing fast and clearly."""
from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ostinato", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_serve_help_lists_the_options():
    out = run_cli("serve", "--help").stdout
    for opt in ("--model", "--served-model-name", "--host", "--port", "--api-key", "--threads",
                "--max-num-seqs", "--max-model-len", "--kv-cache-gb", "--max-queued-requests",
                "--max-body-mb"):
        assert opt in out, opt


def test_serve_exits_on_a_bad_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    res = run_cli("serve", "--model", str(bad), "--port", "0", "--log-level", "warning")
    assert res.returncode == 1
    assert "ostinato: error:" in res.stderr and "broken.gguf" in res.stderr


def test_serve_exits_on_a_missing_model():
    res = run_cli("serve", "--model", "/nonexistent/model.gguf")
    assert res.returncode == 1 and "no such file" in res.stderr
