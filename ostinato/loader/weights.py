"""GGUF tensors -> the fp32 weights the model files expect, checked against the config."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ..config import ModelConfig
from ..kernels.backend import QWeight
from ..kernels.repack import repack
from .dequant import load_tensor
from .gguf import GGUFError, GGUFFile

Progress = Callable[[int, int], None]       # (bytes loaded so far, total bytes)
# For callers that cannot pass `progress` down (LLM.__init__ loads the weights): the CLI
# sets it around the load with report_progress(...).
_PROGRESS: ContextVar[Progress | None] = ContextVar("ostinato_weight_progress", default=None)


@contextmanager
def report_progress(callback: Progress) -> Iterator[None]:
    """Within the block, load_weights calls callback(done, total) after each tensor."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd = cfg.d_model, cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attn_q.weight": (cfg.n_heads * hd, d),
            p + "attn_k.weight": (cfg.n_kv_heads * hd, d),
            p + "attn_v.weight": (cfg.n_kv_heads * hd, d),
            p + "attn_output.weight": (d, cfg.n_heads * hd),
            p + "ffn_gate.weight": (cfg.ffn_dim, d), p + "ffn_up.weight": (cfg.ffn_dim, d),
            p + "ffn_down.weight": (d, cfg.ffn_dim),
        }
        if cfg.qk_norm:
            shapes |= {p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,)}
        if cfg.post_norms:
            shapes |= {p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)}
    return shapes


def load_weights(gf: GGUFFile, cfg: ModelConfig,
                 progress: Progress | None = None) -> dict[str, torch.Tensor | QWeight]:
    """Vectors as float32 tensors; matrices repacked for the quantized kernels.
    progress(done, total), in file bytes, runs after each tensor (default: the one set by
    report_progress, if any)."""
    shapes = expected_shapes(cfg)
    if "output.weight" in gf.tensors:
        shapes["output.weight"] = (cfg.vocab_size, cfg.d_model)
    progress = progress or _PROGRESS.get()
    total = sum(gf.tensors[n].nbytes for n in shapes if n in gf.tensors)
    done = 0
    weights = {}
    for name, shape in shapes.items():
        info = gf.tensors.get(name)
        if info is None:
            raise GGUFError(f"{gf.path}: tensor {name!r} is missing for a {cfg.arch} model")
        if info.shape != shape:
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {info.shape}, "
                            f"expected {shape} from the metadata")
        if len(shape) == 2:
            weights[name] = QWeight.from_packed(repack(gf, name))
        else:
            weights[name] = torch.from_numpy(load_tensor(gf, name))
        done += info.nbytes
        if progress is not None:
            progress(done, total)
    return fuse_projections(weights, cfg.n_layers)


FUSED = {"attn_qkv.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
         "ffn_gate_up.weight": ("ffn_gate.weight", "ffn_up.weight")}


def fuse_projections(weights: dict, n_layers: int) -> dict:
    """Where q/k/v (and gate/up) share a layout, replace them by one stacked matrix: fewer
    kernel calls per layer, identical results."""
    for i in range(n_layers):
        p = f"blk.{i}."
        for fused, names in FUSED.items():
            w = QWeight.concat([weights[p + n] for n in names])
            if w is not None:
                weights[p + fused] = w
                for n in names:
                    del weights[p + n]
    return weights
