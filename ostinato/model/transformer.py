"""One decoder for both families: Llama (SmolLM2) and Gemma 3 differ only in switches that
ModelConfig sets (q/k norm, post norms, GeGLU, embedding scale, sliding-window layers).

Pure math over a dict of weights named as in GGUF; the `ops` object (kernels/backend.py)
supplies the matmul, norm, activation and attention implementations, so quantization and
kernels are decided outside this file.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .attention import AttentionMetadata
from .layers import rope_inv_freq, rope_tables


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: dict, ops):
        self.cfg, self.w, self.ops = cfg, weights, ops
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])
        self.inv_freq_global = rope_inv_freq(cfg.head_dim, cfg.rope_base)
        self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_base_local)
        self.shapes = {"ffn_gate": cfg.ffn_dim, "ffn_up": cfg.ffn_dim}   # split of ffn_gate_up

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.w["token_embd.weight"].rows(input_ids)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden (T, d_model) after the final norm."""
        x = self.embed(input_ids)
        rope = self.rope(positions)
        for i in range(self.cfg.n_layers):
            x = self.layer(i, x, rope, meta, kv_caches[i])
        return self.norm(x, "output_norm.weight")

    def rope(self, positions: torch.Tensor) -> dict:
        """{is_sliding: (cos, sin)}: this step's rotary tables, shared by every layer."""
        rope = {False: rope_tables(positions, self.inv_freq_global)}
        rope[True] = (rope_tables(positions, self.inv_freq_local) if self.cfg.sliding_window
                      else rope[False])
        return rope

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head)          # (N, vocab)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.ops.rms_norm(x, self.w[name], self.cfg.rms_eps)

    def layer(self, i: int, x, rope, meta, kv_cache) -> torch.Tensor:
        cfg, p = self.cfg, f"blk.{i}."
        h = self.attention(i, self.norm(x, p + "attn_norm.weight"), rope, meta, kv_cache)
        if cfg.post_norms:
            h = self.norm(h, p + "post_attention_norm.weight")
        x = x + h
        h = self.mlp(i, self.norm(x, p + "ffn_norm.weight"))
        if cfg.post_norms:
            h = self.norm(h, p + "post_ffw_norm.weight")
        return x + h

    def project(self, x: torch.Tensor, p: str, fused: str, names: tuple[str, ...]):
        """The projections `names`, computed as one stacked matmul when the loader fused
        them (weights[p + fused]), else one by one."""
        if p + fused in self.w:
            sizes = [self.shapes[n] for n in names]
            return self.ops.linear(x, self.w[p + fused]).split(sizes, dim=-1)
        return [self.ops.linear(x, self.w[p + n + ".weight"]) for n in names]

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"blk.{i}."
        gate, up = self.project(x, p, "ffn_gate_up.weight", ("ffn_gate", "ffn_up"))
        return self.ops.linear(self.ops.gated_act(gate, up, self.cfg.act),
                               self.w[p + "ffn_down.weight"])

    def attention(self, i: int, x, rope, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        """rope: {is_sliding: (cos, sin)} tables for this step's positions."""
        cfg, w, p, ops = self.cfg, self.w, f"blk.{i}.", self.ops
        T = x.shape[0]
        if p + "attn_qkv.weight" in w:
            qkv = ops.linear(x, w[p + "attn_qkv.weight"])
        else:                       # the loader could not fuse them: three matmuls
            qkv = torch.cat([ops.linear(x, w[p + n + ".weight"])
                             for n in ("attn_q", "attn_k", "attn_v")], dim=-1)
        sliding = cfg.is_sliding(i)
        cos, sin = rope[sliding]
        k_cache, v_cache = kv_cache
        group = cfg.layer_kv_group(i)
        # q/k norm (Gemma 3), rotary embedding, and k/v into the paged cache
        q = ops.qkv_rope_cache(qkv, w.get(p + "attn_q_norm.weight"), w.get(p + "attn_k_norm.weight"),
                               cfg.rms_eps, cos, sin, cfg.rope_neox, cfg.n_heads, k_cache, v_cache,
                               meta.slot_mappings[group])
        o = ops.attention(q, k_cache, v_cache, meta.tables[group], meta.seq_meta,
                          cfg.attn_scale, cfg.sliding_window if sliding else None)
        return ops.linear(o.reshape(T, -1), w[p + "attn_output.weight"])
