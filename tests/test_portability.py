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
    _pytest("haswell", str(TESTS / "test_kernels.py"), str(TESTS / "test_plan.py"),
            str(TESTS / "test_portability.py::test_panel_isa_follows_the_build"))


def test_the_avx512_build_without_vnni_passes_the_matmul_tests():
    if not {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= _cpu_flags():
        pytest.skip("this CPU cannot run a Skylake-SP (AVX-512) build")
    _pytest("skylake-avx512", "-k", "qlinear or panels or quantized_activations or panel_isa",
            str(TESTS / "test_kernels.py"), str(TESTS / "test_portability.py::"
                                                  "test_panel_isa_follows_the_build"))


def _native_panel_isa(flags: set[str]) -> str:
    if {"avx512bw", "avx512_vnni"} <= flags:
        return "avx512_vnni"
    if "avx512bw" in flags:
        return "avx512bw"
    return "avx_vnni" if "avx_vnni" in flags else "avx2"


def test_panel_isa_follows_the_build():
    """The weight panels' instruction set is the one the build's -march gives: this CPU's
    natively, and run again (above) under OSTINATO_MARCH=haswell and skylake-avx512."""
    from ostinato.kernels import ops
    march = os.environ.get("OSTINATO_MARCH", "native")
    want = {"haswell": "avx2", "skylake-avx512": "avx512bw"}.get(march)
    if want is None and march != "native":
        pytest.skip(f"OSTINATO_MARCH={march}: no expectation for that build")
    assert ops().panel_isa() == (want or _native_panel_isa(_cpu_flags()))
