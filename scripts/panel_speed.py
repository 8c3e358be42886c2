"""The quantized matmul on weight panels (kernels/csrc/panels.h) against the AVX tiles, one
batch size at a time, interleaved A/B in one process (best of 5 calls, 3 rounds each):

    python scripts/panel_speed.py [--threads 1] [--rows 4,8,16,64,256]
    OSTINATO_MARCH=haswell python scripts/panel_speed.py     # the AVX2 build

Weights are random GGUF blocks of the shapes SmolLM2 and Qwen2.5 multiply (gate/up and down);
they stay in cache between calls, so this measures arithmetic, not memory. AMX is turned off
for the run (where the CPU has it, it takes these batches instead)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_kernels import packed                      # noqa: E402 (random GGUF blocks)

from ostinato.kernels.backend import CpuKernels, QWeight  # noqa: E402

SHAPES = [("Q4_1", 1536, 576), ("Q4_1", 576, 1536), ("Q4_K", 4864, 1024), ("Q6_K", 1024, 4864)]


def best(k, w, x, calls: int = 5) -> float:
    k.linear(x, w)
    out = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        k.linear(x, w)
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="4,8,16,64,256")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    k = CpuKernels()
    ops = k.ops
    panels, amx = ops.panel_settings(), ops.amx_settings()
    print(f"panels: {ops.panel_isa()}, {a.threads} thread(s)")
    try:
        ops.set_amx(False, amx[1])
        for type_name, n, kk in SHAPES:
            _, p = packed(type_name, N=n, K=kk, seed=1)
            w = QWeight.from_packed(p)
            for m in map(int, a.rows.split(",")):
                x = torch.randn(m, kk)
                tiles, panel = [], []
                for _ in range(3):
                    ops.set_panels(False, 1)
                    tiles.append(best(k, w, x))
                    ops.set_panels(True, 1)
                    panel.append(best(k, w, x))
                t, pn = min(tiles), min(panel)
                gf = 2 * m * n * kk / 1e9
                print(f"{type_name} {n}x{kk} rows {m:4d}: tiles {t * 1e3:7.2f} ms "
                      f"({gf / t:5.0f} GFLOP/s), panels {pn * 1e3:7.2f} ms ({gf / pn:5.0f} "
                      f"GFLOP/s), {t / pn:.2f}x")
    finally:
        ops.set_panels(*panels)
        ops.set_amx(*amx)


if __name__ == "__main__":
    main()
