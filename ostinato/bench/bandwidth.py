"""The memory-bandwidth ceiling of batch-1 decode: a decode step reads every weight matrix it
multiplies once, so tok/s <= bandwidth / bytes read per token. `bench` reports what fraction
of that ceiling each engine reaches, with the bandwidth measured on the machine, then."""
from __future__ import annotations

import time

import torch


def read_bandwidth_gbs(mb: int = 1024, repeats: int = 5) -> float:
    """Sustained read bandwidth in GB/s: the best of `repeats` sums over an `mb` MB float32
    array (far larger than the caches), on torch's threads."""
    x = torch.ones(mb * (1 << 20) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _unique_matrices(value, seen: dict) -> None:
    """The backend's weights (QWeight, StackedPart, lists of them) by identity."""
    if isinstance(value, list):
        for v in value:
            _unique_matrices(v, seen)
        return
    stacked = getattr(value, "stacked", None)
    value = stacked if stacked is not None else value
    if hasattr(value, "nbytes") and getattr(value, "K", 0):
        seen[id(value)] = value


def ours_bytes_per_token(model, bf16: bool = False) -> int:
    """Bytes of weight matrices one batch-1 decode step reads in our layout: every matrix of
    the layers and the LM head (the embedding table is read one row per token); with experts,
    only the used share of them. bf16 (--dtype bfloat16): the quantized matrices outside the
    experts are read as their bfloat16 copies."""
    from ..kernels.plan import packed_bf16_bytes
    from ..kernels.repack import F32
    seen: dict = {}
    for name, w in model.w.items():
        if name != "token_embd.weight":
            _unique_matrices(w, seen)
    _unique_matrices(model.lm_head, seen)
    experts = model.cfg.experts
    exps: dict = {}
    for name, w in model.w.items():
        if "_exps." in name:
            _unique_matrices(w, exps)
    total = sum(packed_bf16_bytes(w) if bf16 and w.fmt != F32 and i not in exps else w.nbytes
                for i, w in seen.items())
    if experts:
        expert_bytes = sum(w.nbytes for w in exps.values())
        total -= expert_bytes * (1 - experts.used / experts.count)
    return int(total)


def gguf_bytes_per_token(gf) -> int:
    """The same for the file's own blocks (what llama.cpp reads): every tensor of two or more
    dimensions but the embedding table, which counts as the LM head when there is no
    `output.weight`."""
    total = 0
    for name, info in gf.tensors.items():
        if len(info.shape) < 2 or (name == "token_embd.weight" and "output.weight" in gf.tensors):
            continue
        total += gf.raw(name).size
    return total
