"""The LM head alone (the model's output matmul on the int16 path), ms a call at a few row
counts, best of a few calls, with a hash of the logits so that two builds can be compared bit
for bit:

    python scripts/lm_head_speed.py [--models smollm2-135m-instruct,gemma3-270m] [--rows 16,64]
    PYTHONPATH=/path/to/other/checkout python scripts/lm_head_speed.py   # the A in an A/B

Rows of random activations (seeded); 2 threads unless --threads. From 33 rows an output past
8 MiB is staged per thread (csrc/amx.h, stage_output)."""
from __future__ import annotations

import argparse
import hashlib
import time

import torch

from ostinato import LLM
from ostinato.kernels import ops
from ostinato.kernels.backend import qw_of

MODELS = "smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct"


def best_ms(f, seconds: float = 0.4) -> float:
    f()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--rows", default="16,32,64,128")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for model in args.models.split(","):
        llm = LLM(model)
        w = llm.engine.runner.model.w
        head = w.get("output.weight", w["token_embd.weight"])
        q = qw_of(head)
        cells = []
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, head.K, generator=torch.Generator().manual_seed(m))
            mask = torch.zeros(m, dtype=torch.uint8)              # every row on int16
            out = ops().qlinear_rows(x, q, mask)
            digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()[:8]
            cells.append(f"{m} rows {best_ms(lambda: ops().qlinear_rows(x, q, mask)):.2f} ms "
                         f"({digest})")
        print(f"{model}: {head.N} x {head.K}, " + ", ".join(cells), flush=True)
        del llm


if __name__ == "__main__":
    main()
