"""The kernels build for AVX2 CPUs too (AMD EPYC, older Intel): on an AVX-512/AMX machine
the AVX-512 paths are what run, so here the kernel and plan tests run again against a build
for Haswell (AVX2, FMA, F16C), in a fresh process with its own cached build."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.model


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(ln for ln in f if ln.startswith("flags")).split(":")[1].split())


def test_the_avx2_build_passes_the_kernel_and_plan_tests():
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    env = {**os.environ, "OSTINATO_MARCH": "haswell"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(TESTS / "test_kernels.py"), str(TESTS / "test_plan.py")],
                       env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
