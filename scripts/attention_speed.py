"""The attention kernel alone on one prompt's keys (a prefill chunk that reads its whole
context), one layer, best of a few calls, with a hash of the output so that two builds can be
compared bit for bit:

    python scripts/attention_speed.py [--tokens 2048] [--dtype float16]
    PYTHONPATH=/path/to/other/checkout python scripts/attention_speed.py   # the A in an A/B

Shapes: SmolLM2 (9 heads on 3 KV heads, head dim 64), Gemma 3's sliding layers (4 heads on
1 KV head, head dim 256, window 512) and Qwen2.5-0.5B (14 heads on 2 KV heads). The cache
holds random keys and values in shuffled blocks of 16 slots (the tests' `_paged`)."""
from __future__ import annotations

import argparse
import hashlib
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_kernels import _paged as paged             # noqa: E402 (a cache in shuffled blocks)

from ostinato.kernels.backend import CpuKernels      # noqa: E402

SHAPES = [("smollm2", 9, 3, 64, None), ("gemma3-sliding", 4, 1, 256, 512),
          ("qwen2.5-0.5b", 14, 2, 64, None)]


def run(k: CpuKernels, L: int, H: int, KV: int, D: int, window, calls: int) -> tuple[float, str]:
    _, _, kc, vc, table = paged(k, L, KV, D, 16, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(L, H * D, generator=g)
    meta = torch.tensor([[0, L, L]])
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        o = k.attention(q, kc, vc, table[None], meta, 0.125, window)
        best = min(best, time.perf_counter() - t)
    return best, hashlib.sha256(o.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    k = CpuKernels(kv_cache_dtype=a.dtype)
    for name, H, KV, D, window in SHAPES:
        best, digest = run(k, a.tokens, H, KV, D, window, a.calls)
        print(f"{name:15s} {a.dtype} {a.tokens} tokens: {best * 1e3:7.2f} ms  output {digest}")


if __name__ == "__main__":
    main()
