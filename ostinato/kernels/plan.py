"""Compile a Transformer into a C++ Plan: every layer's weights and KV caches are handed to
the extension once, at start-up, and a step is then one call (no Python between layers, and
the GIL is released while it runs). The Plan runs the same kernels in the same order as
model/transformer.py, so its output is the same bits (tests/test_plan.py)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops
from .backend import EMPTY, CpuKernels, QWeight


def _qw(w: QWeight):
    return ops().QW(w.q, w.scale, w.min, w.fmt, w.bs, w.zp, w.N, w.K)


def compile_plan(model, kv_caches: list, max_tokens: int, max_context: int) -> Callable | None:
    """A drop-in for model.forward, or None when the model can't be planned (the torch
    backend, or q/k/v or gate/up that the loader could not fuse). Its workspace and the
    kernels' scratch are sized for steps of up to max_tokens tokens whose queries see up to
    max_context keys; `forward.plan.reserve(...)` sizes a new thread's scratch too. The
    hidden states it returns are a view of the workspace: valid until the next call."""
    cfg, w = model.cfg, model.w
    if not isinstance(model.ops, CpuKernels):
        return None
    if any(f"blk.{i}.{n}" not in w for i in range(cfg.n_layers)
           for n in ("attn_qkv.weight", "ffn_gate_up.weight")):
        return None
    plan = ops().Plan(cfg.n_heads, cfg.ffn_dim, cfg.rms_eps, int(cfg.rope_neox),
                      int(cfg.act != "silu"), cfg.attn_scale, cfg.sliding_window or 0,
                      int(model.ops.quantize_activations), w["output_norm.weight"])
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        opt = lambda name: w.get(p + name, EMPTY)   # noqa: E731
        plan.add_layer(w[p + "attn_norm.weight"], opt("attn_q_norm.weight"),
                       opt("attn_k_norm.weight"), opt("post_attention_norm.weight"),
                       w[p + "ffn_norm.weight"], opt("post_ffw_norm.weight"),
                       _qw(w[p + "attn_qkv.weight"]), _qw(w[p + "attn_output.weight"]),
                       _qw(w[p + "ffn_gate_up.weight"]), _qw(w[p + "ffn_down.weight"]),
                       cfg.layer_kv_group(i), int(cfg.is_sliding(i)), *kv_caches[i])

    def inputs(input_ids, positions, meta) -> tuple:
        """plan.forward's arguments: the embedded tokens and the rotary tables (computed in
        torch: a few KB per token), and the slots, block tables and sequence rows."""
        rope = model.rope(positions)
        return (model.embed(input_ids), [rope[False][0], rope[True][0]],
                [rope[False][1], rope[True][1]], meta.slot_mappings, meta.tables, meta.seq_meta)

    def forward(input_ids, positions, meta, caches=None) -> torch.Tensor:
        return plan.forward(*inputs(input_ids, positions, meta))
    plan.reserve(max_tokens, max_context)
    # plan.set_profile(True) / plan.profile(): seconds per stage, for bench
    forward.plan, forward.inputs = plan, inputs
    return forward
