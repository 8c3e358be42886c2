"""The CLI explains itself: help with examples for every subcommand, one-line usage errors,
and `ostinato models` naming each pulled model's quantization."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ostinato.cli import COMMANDS, quantization


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ostinato", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_subcommand_has_examples(cmd):
    res = cli(cmd, "--help")
    assert res.returncode == 0 and "examples:" in res.stdout, res.stdout


def test_usage_error_is_one_line():
    res = cli("generate", "--max-tokens", "many", "--prompt", "x")
    assert res.returncode == 2
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr


def test_quantization_of_the_embedded_models(smollm_path, gemma_path):
    assert quantization(smollm_path) == "Q4_1"
    assert quantization(gemma_path) == "Q4_K_M"
    out = cli("models").stdout
    assert "Q4_1" in out and "Q4_K_M" in out
