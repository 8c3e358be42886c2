"""The one decoder. Every family (model/families.py) is this code with its switches set from
the file (ModelConfig): norm placement, q/k norms, activation, rotary variants, sliding
windows, embedding scale.

Pure math over the backend's weights (named as in GGUF), written only in calls on `ops`: the
eager backends compute them at once, and kernels/plan.py records the same calls once to
derive the static plan, so the decoder is never written a second time.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata
from .config import ModelConfig
from .layers import rope_inv_freq, rope_tables


def tensor_shapes(cfg: ModelConfig) -> tuple[dict, dict]:
    """(required, optional): the tensors a file of this config must or may carry, by name,
    with their shapes in numpy order."""
    d, hd, fam = cfg.d_model, cfg.head_dim, cfg.family
    required = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        required |= {
            p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attn_q.weight": (cfg.n_heads * hd, d),
            p + "attn_k.weight": (cfg.n_kv_heads * hd, d),
            p + "attn_v.weight": (cfg.n_kv_heads * hd, d),
            p + "attn_output.weight": (d, cfg.n_heads * hd),
            p + "ffn_gate.weight": (cfg.ffn_dim, d), p + "ffn_up.weight": (cfg.ffn_dim, d),
            p + "ffn_down.weight": (d, cfg.ffn_dim),
        }
        if fam.qk_norm:
            required |= {p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,)}
        if fam.post_norms:
            required |= {p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)}
    optional = {"output.weight": (cfg.vocab_size, d), "rope_freqs.weight": (hd // 2,)}
    optional = {n: s for n, s in optional.items() if n in fam.optional_tensors}
    if any(r.freq_factors for r in cfg.ropes):
        required["rope_freqs.weight"] = optional.pop("rope_freqs.weight")
    return required, optional


def stacked_groups(cfg: ModelConfig) -> list[tuple[str, ...]]:
    """The weights the decoder multiplies by one input together (a backend may stack them)."""
    return [g for i in range(cfg.n_layers) for g in
            (tuple(f"blk.{i}.attn_{n}.weight" for n in "qkv"),
             (f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"))]


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: dict, ops):
        self.cfg, self.w, self.ops = cfg, weights, ops
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])
        factors = weights.get("rope_freqs.weight")
        self.inv_freqs = [rope_inv_freq(cfg.head_dim, r, factors) for r in cfg.ropes]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.ops.embed(self.w["token_embd.weight"], input_ids)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's (cos, sin) tables, one per rotary variant, shared by every layer."""
        return [rope_tables(positions, inv) for inv in self.inv_freqs]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden (T, d_model) after the final norm."""
        return self.decode(self.embed(input_ids), self.rope(positions), meta, kv_caches)

    def decode(self, x, rope, meta: AttentionMetadata, kv_caches):
        """The layers and the final norm: the part the static plan records."""
        for i in range(self.cfg.n_layers):
            x = self.layer(i, x, rope, meta, kv_caches[i])
        return self.norm(x, "output_norm.weight")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head)          # (N, vocab)

    def norm(self, x, name: str):
        return self.ops.rms_norm(x, self.w[name], self.cfg.rms_eps)

    def layer(self, i: int, x, rope, meta, kv_cache):
        p, ops = f"blk.{i}.", self.ops
        h = self.attention(i, self.norm(x, p + "attn_norm.weight"), rope, meta, kv_cache)
        if self.cfg.family.post_norms:
            h = self.norm(h, p + "post_attention_norm.weight")
        x = ops.add(x, h)
        h = self.mlp(i, self.norm(x, p + "ffn_norm.weight"))
        if self.cfg.family.post_norms:
            h = self.norm(h, p + "post_ffw_norm.weight")
        return ops.add(x, h)

    def mlp(self, i: int, x):
        w, ops = self.w, self.ops
        gate_up = ops.linear(x, [w[f"blk.{i}.ffn_gate.weight"], w[f"blk.{i}.ffn_up.weight"]])
        act = ops.gated_act(gate_up, self.cfg.family.act)
        return ops.linear(act, w[f"blk.{i}.ffn_down.weight"])

    def attention(self, i: int, x, rope, meta: AttentionMetadata, kv_cache):
        """rope: this step's tables per rotary variant. (T, d) -> (T, d)."""
        cfg, w, p, ops = self.cfg, self.w, f"blk.{i}.", self.ops
        qkv = ops.linear(x, [w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]])
        cos, sin = rope[cfg.layer_rope[i]]
        k_cache, v_cache = kv_cache
        group = cfg.layer_kv_group(i)
        # q/k norm (Gemma 3), rotary embedding, and k/v into the paged cache
        q = ops.qkv_rope_cache(qkv, w.get(p + "attn_q_norm.weight"), w.get(p + "attn_k_norm.weight"),
                               cfg.rms_eps, cos, sin, cfg.family.rope_neox, cfg.n_heads, k_cache,
                               v_cache, meta.slot_mappings[group])
        o = ops.attention(q, k_cache, v_cache, meta.tables[group], meta.seq_meta,
                          cfg.attn_scale, cfg.sliding_window if cfg.is_sliding(i) else None)
        return ops.linear(o, w[p + "attn_output.weight"])
