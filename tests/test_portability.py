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


AVX2 = {"avx2", "fma", "f16c"}
AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
RUNS = {    # march -> (the flags it needs, the pytest arguments it runs)
    "haswell": (AVX2, (str(TESTS / "test_kernels.py"), str(TESTS / "test_plan.py"))),
    # test_weight_panels_give_the_avx_kernels_bits checks the build's panels are avx512bw
    "skylake-avx512": (AVX512, ("-k", "qlinear or panels or quantized_activations",
                                str(TESTS / "test_kernels.py"))),
}


@pytest.fixture(scope="module")
def runs():
    """Each build's test run in a fresh process, all started at once: a build compiles one
    file on one core for a minute or more, so on two cores they overlap."""
    flags = _cpu_flags()
    procs = {march: subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
        env={**os.environ, "OSTINATO_MARCH": march}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for march, (need, args) in RUNS.items()
        if need <= flags}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def _passed(runs: dict, march: str) -> None:
    if march not in runs:
        pytest.skip(f"this CPU cannot run a {march} build")
    out, err = runs[march].communicate(timeout=1200)
    assert runs[march].returncode == 0, out[-4000:] + err[-2000:]
    assert " passed" in out and " failed" not in out


def test_the_avx2_build_passes_the_kernel_and_plan_tests(runs):
    _passed(runs, "haswell")


def test_the_avx512_build_without_vnni_passes_the_matmul_tests(runs):
    _passed(runs, "skylake-avx512")
