"""One decoder for both families: Llama (SmolLM2) and Gemma 3 differ only in switches that
ModelConfig sets (q/k norm, post norms, GeGLU, embedding scale, sliding-window layers).

Pure math over a dict of weights named as in GGUF; the loader decides dtype and placement.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .attention import AttentionMetadata, paged_attention, write_kv
from .layers import apply_rope, gated_mlp, rms_norm, rope_inv_freq


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = weights
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])
        self.inv_freq_global = rope_inv_freq(cfg.head_dim, cfg.rope_base)
        self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_base_local)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.w["token_embd.weight"])
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden (T, d_model) after the final norm."""
        x = self.embed(input_ids)
        for i in range(self.cfg.n_layers):
            x = self.layer(i, x, positions, meta, kv_caches[i])
        return rms_norm(x, self.w["output_norm.weight"], self.cfg.rms_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)          # (N, vocab)

    def layer(self, i: int, x, positions, meta, kv_cache) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, f"blk.{i}."
        h = self.attention(i, rms_norm(x, w[p + "attn_norm.weight"], cfg.rms_eps),
                           positions, meta, kv_cache)
        if cfg.post_norms:
            h = rms_norm(h, w[p + "post_attention_norm.weight"], cfg.rms_eps)
        x = x + h
        h = gated_mlp(rms_norm(x, w[p + "ffn_norm.weight"], cfg.rms_eps),
                      w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"],
                      w[p + "ffn_down.weight"], cfg.act)
        if cfg.post_norms:
            h = rms_norm(h, w[p + "post_ffw_norm.weight"], cfg.rms_eps)
        return x + h

    def attention(self, i: int, x, positions, meta, kv_cache) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, f"blk.{i}."
        T = x.shape[0]
        q = F.linear(x, w[p + "attn_q.weight"]).view(T, cfg.n_heads, cfg.head_dim)
        k = F.linear(x, w[p + "attn_k.weight"]).view(T, cfg.n_kv_heads, cfg.head_dim)
        v = F.linear(x, w[p + "attn_v.weight"]).view(T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, w[p + "attn_q_norm.weight"], cfg.rms_eps)
            k = rms_norm(k, w[p + "attn_k_norm.weight"], cfg.rms_eps)
        sliding = cfg.is_sliding(i)
        inv_freq = self.inv_freq_local if sliding else self.inv_freq_global
        q = apply_rope(q, positions, inv_freq, cfg.rope_neox)
        k = apply_rope(k, positions, inv_freq, cfg.rope_neox)
        k_cache, v_cache = kv_cache
        group = cfg.layer_kv_group(i)
        write_kv(k_cache, v_cache, k, v, meta.slot_mappings[group])
        o = paged_attention(q, k_cache, v_cache, meta, group, cfg.attn_scale,
                            cfg.sliding_window if sliding else None)
        return F.linear(o.reshape(T, -1), w[p + "attn_output.weight"])
