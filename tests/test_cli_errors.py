"""Bad model files through the real CLI: non-zero exit, one line naming the file and the
problem, within seconds."""
from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ostinato", *args], capture_output=True,
                          text=True, timeout=timeout)


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _tiny_gguf(arch: str) -> bytes:
    kv = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(arch)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv


def _assert_one_line_error(res: subprocess.CompletedProcess, path, words: list[str]) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("loading")]
    assert len(lines) == 1, res.stderr
    assert str(path) in lines[0], lines[0]
    for w in words:
        assert w in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case, content, words", [
    ("missing", None, ["no such file"]),
    ("garbage", b"not a gguf file at all, just text" * 10, ["not a gguf"]),
    ("unknown_arch", _tiny_gguf("mamba9"), ["unsupported architecture", "mamba9"]),
    ("forged_count", b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0), ["forged or corrupt"]),
])
def test_bad_file_one_line(tmp_path, case, content, words):
    path = tmp_path / f"{case}.gguf"
    if content is not None:
        path.write_bytes(content)
    t0 = time.perf_counter()
    res = run_cli("generate", "--model", str(path), "--prompt", "hi")
    assert time.perf_counter() - t0 < 30
    _assert_one_line_error(res, path, words)


def test_truncated_real_file(tmp_path, smollm_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        cut.write_bytes(f.read(40_000_000))          # header intact, tensor data cut short
    res = run_cli("generate", "--model", str(cut), "--prompt", "hi")
    _assert_one_line_error(res, cut, ["outside the file"])


def test_help_has_examples():
    res = run_cli("--help")
    assert res.returncode == 0 and "examples:" in res.stdout and "generate" in res.stdout
