"""The attention kernel alone on one prompt's keys (a prefill chunk that reads its whole
context), one layer, best of a few calls, with a hash of the output so that two builds can be
compared bit for bit:

    python scripts/attention_speed.py [--tokens 2048] [--dtype float16|float32|int8-values]
    PYTHONPATH=/path/to/other/checkout python scripts/attention_speed.py   # the A in an A/B
    python scripts/attention_speed.py --decode 64 --tokens 140   # a decode step of 64 streams

--decode S: one step of S streams through all the layers of a 30-layer model, each stream
with --tokens of context of which the last --query-tokens (default 1: a decode row; more: a
prefill chunk) are queries; each layer's cache is a pool of 1 GB / 30, as the engine sizes it
by default, with the streams' blocks scattered over it: what a step reads from memory.

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


def decode_step(k: CpuKernels, S: int, C: int, H: int, KV: int, D: int, window, calls: int,
                Q: int = 1, layers: int = 30,
                pool_bytes: int = (1 << 30) // 30) -> tuple[float, str]:
    nb, BS = -(-C // 16), 16
    blocks = max(S * nb + 1, pool_bytes // k.kv_cache_bytes(BS, KV, D))
    g = torch.Generator().manual_seed(1)
    caches = []
    for _ in range(layers):
        kc, vc = k.new_kv_cache(blocks, BS, KV, D)
        kc.zero_(), vc.zero_()              # resident, as a server's warm-up leaves them
        table = (torch.randperm(blocks - 1, generator=g)[:S * nb] + 1).view(S, nb)
        kc[table.flatten()] = torch.randn(S * nb, *kc.shape[1:], generator=g).to(kc.dtype)
        if vc.dtype == torch.int8:          # codes, and scales of a randn's magnitude
            vc[table.flatten()] = torch.randint(-127, 128, (S * nb, *vc.shape[1:]), generator=g,
                                                dtype=torch.int8)
            CpuKernels._v_scales(vc, BS).fill_(2.5 / 127)
        else:
            vc[table.flatten()] = torch.randn(S * nb, *vc.shape[1:], generator=g).to(vc.dtype)
        caches.append((kc, vc, table))
    q = torch.randn(S * Q, H * D, generator=g)
    meta = torch.tensor([[i * Q, Q, C] for i in range(S)])
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        for kc, vc, table in caches:
            o = k.attention(q, kc, vc, table, meta, 0.125, window)
        best = min(best, time.perf_counter() - t)
    return best, hashlib.sha256(o.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", choices=["float16", "float32", "int8-values"],
                    default="float16")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--decode", type=int, default=0, metavar="S",
                    help="a decode step of S streams over 30 layers instead of one prompt")
    ap.add_argument("--query-tokens", type=int, default=1, metavar="Q",
                    help="with --decode: each stream's last Q tokens are queries (a prefill "
                         "chunk at the end of its context when Q > 1)")
    a = ap.parse_args()
    k = CpuKernels(kv_cache_dtype=a.dtype)
    for name, H, KV, D, window in SHAPES:
        if a.decode:
            best, digest = decode_step(k, a.decode, a.tokens, H, KV, D, window, a.calls,
                                       a.query_tokens)
            print(f"{name:15s} {a.dtype} decode step, {a.decode} streams of {a.tokens} tokens "
                  f"({a.query_tokens} queries), 30 layers: {best * 1e3:7.2f} ms  output {digest}")
            continue
        best, digest = run(k, a.tokens, H, KV, D, window, a.calls)
        print(f"{name:15s} {a.dtype} {a.tokens} tokens: {best * 1e3:7.2f} ms  output {digest}")


if __name__ == "__main__":
    main()
