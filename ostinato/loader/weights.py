"""GGUF tensors -> the fp32 weights the model files expect, checked against the config."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels.backend import QWeight
from ..kernels.repack import repack
from .dequant import load_tensor
from .gguf import GGUFError, GGUFFile


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


def load_weights(gf: GGUFFile, cfg: ModelConfig) -> dict[str, torch.Tensor | QWeight]:
    """Vectors as float32 tensors; matrices repacked for the quantized kernels."""
    shapes = expected_shapes(cfg)
    if "output.weight" in gf.tensors:
        shapes["output.weight"] = (cfg.vocab_size, cfg.d_model)
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
    return weights
