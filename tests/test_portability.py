"""The kernels build for AVX2 CPUs too (AMD EPYC, older Intel): on an AVX-512/AMX machine
the AVX-512 paths are what run, so here the kernel and plan tests run again against a build
for Haswell (AVX2, FMA, F16C), in a fresh process with its own cached build; and the
quantized matmul's tests against a build for Skylake-SP (AVX-512 without VNNI), whose weight
panels multiply with madd + add instead of VNNI's dpwssd."""
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


def _pytest(march: str, *args: str) -> None:
    env = {**os.environ, "OSTINATO_MARCH": march}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        *args], env=env, capture_output=True, text=True, timeout=1200,
                       check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_the_avx2_build_passes_the_kernel_and_plan_tests():
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    _pytest("haswell", str(TESTS / "test_kernels.py"), str(TESTS / "test_plan.py"))


def test_the_avx512_build_without_vnni_passes_the_matmul_tests():
    if not {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= _cpu_flags():
        pytest.skip("this CPU cannot run a Skylake-SP (AVX-512) build")
    # test_weight_panels_give_the_avx_kernels_bits checks the build's panels are avx512bw
    _pytest("skylake-avx512", "-k", "qlinear or panels or quantized_activations",
            str(TESTS / "test_kernels.py"))
