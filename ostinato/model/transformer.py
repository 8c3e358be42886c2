"""The one decoder. Every family (model/families.py) is this code with its switches set from
the file (ModelConfig): norm placement, q/k norms, biases, fused projections, activation,
rotary variants, sliding windows, soft-caps, multipliers, routed experts.

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
    required = {"token_embd.weight": (cfg.vocab_size, cfg.d_model),
                "output_norm.weight": (cfg.d_model,)}
    for i in range(cfg.n_layers):
        required |= {f"blk.{i}.{n}": s for n, s in _layer_shapes(cfg).items()}
    fam = cfg.family
    optional = {"output.weight": (cfg.vocab_size, cfg.d_model),
                "rope_freqs.weight": (cfg.ropes[0].dim // 2,)}
    optional = {n: s for n, s in optional.items() if n in fam.optional_tensors}
    for r in cfg.ropes:
        if r.factors:
            optional.pop(r.factors, None)
            required[r.factors] = (r.dim // 2,)
    if fam.long_rope and cfg.ropes[0].factors:     # LongRoPE files carry both sets
        for n in ("rope_factors_short.weight", "rope_factors_long.weight"):
            required[n] = (cfg.ropes[0].dim // 2,)
    return required, optional


def _layer_shapes(cfg: ModelConfig) -> dict:
    d, hd, fam = cfg.d_model, cfg.head_dim, cfg.family
    qw, kvw = cfg.n_heads * hd, cfg.n_kv_heads * hd
    s = {"attn_output.weight": (d, qw)}
    if fam.pre_norms:
        s |= {"attn_norm.weight": (d,), "ffn_norm.weight": (d,)}
    if fam.post_norms:
        s |= {"post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)}
    if fam.fused_qkv:
        s["attn_qkv.weight"] = (qw + 2 * kvw, d)
    else:
        s |= {"attn_q.weight": (qw, d), "attn_k.weight": (kvw, d), "attn_v.weight": (kvw, d)}
    if fam.qkv_bias:
        s |= {"attn_q.bias": (qw,), "attn_k.bias": (kvw,), "attn_v.bias": (kvw,)}
    if fam.qk_norm:
        whole = fam.qk_norm == "all"
        s |= {"attn_q_norm.weight": (qw if whole else hd,),
              "attn_k_norm.weight": (kvw if whole else hd,)}
    if cfg.experts:
        e, f = cfg.experts.count, cfg.experts.ffn_dim
        s |= {"ffn_gate_inp.weight": (e, d), "ffn_gate_exps.weight": (e, f, d),
              "ffn_up_exps.weight": (e, f, d), "ffn_down_exps.weight": (e, d, f)}
    elif fam.fused_qkv:
        s |= {"ffn_up.weight": (2 * cfg.ffn_dim, d), "ffn_down.weight": (d, cfg.ffn_dim)}
    else:
        s |= {"ffn_gate.weight": (cfg.ffn_dim, d), "ffn_up.weight": (cfg.ffn_dim, d),
              "ffn_down.weight": (d, cfg.ffn_dim)}
    return s


def stacked_groups(cfg: ModelConfig) -> list[tuple[str, ...]]:
    """The weights the decoder multiplies by one input together (a backend may stack them):
    q|k|v and gate|up, or each expert's gate|up."""
    groups = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        if not cfg.family.fused_qkv:
            groups.append(tuple(f"{p}attn_{n}.weight" for n in "qkv"))
        if cfg.experts:
            groups.append((p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"))
        elif not cfg.family.fused_qkv:
            groups.append((p + "ffn_gate.weight", p + "ffn_up.weight"))
    return groups


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: dict, ops):
        self.cfg, self.w, self.ops = cfg, weights, ops
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])
        self.inv_freqs = [rope_inv_freq(r, weights.get(r.factors)) for r in cfg.ropes]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.ops.embed(self.w["token_embd.weight"], input_ids)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's (cos, sin) tables, one per rotary variant, shared by every layer."""
        return [rope_tables(positions, inv, r.attn_factor)
                for inv, r in zip(self.inv_freqs, self.cfg.ropes)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden (T, d_model) after the final norm."""
        return self.decode(self.embed(input_ids), self.rope(positions), meta, kv_caches)

    def decode(self, x, rope, meta: AttentionMetadata, kv_caches):
        """The layers and the final norm: the part the static plan records."""
        for i in range(self.cfg.n_layers):
            x = self.layer(i, x, rope, meta, kv_caches[i])
        return self.norm(x, "output_norm.weight")

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(N, d) -> (N, vocab): the LM head, then Granite's logit divisor and Gemma 2's
        soft-cap (elementwise, so every row is computed alone). out: an (N, vocab) float32
        tensor for the LM head to write into (and the result: any scaling is done in place)."""
        cfg = self.cfg
        logits = self.ops.linear(hidden, self.lm_head, out=out)    # a tensor of its own
        if cfg.logit_scale != 1.0:
            logits.div_(cfg.logit_scale)
        if cfg.final_softcap:
            logits.div_(cfg.final_softcap).tanh_().mul_(cfg.final_softcap)
        return logits

    def norm(self, x, name: str):
        return self.ops.rms_norm(x, self.w[name], self.cfg.rms_eps)

    def layer(self, i: int, x, rope, meta, kv_cache):
        p, fam = f"blk.{i}.", self.cfg.family
        h = self.norm(x, p + "attn_norm.weight") if fam.pre_norms else x
        h = self.attention(i, h, rope, meta, kv_cache)
        if fam.post_norms:
            h = self.norm(h, p + "post_attention_norm.weight")
        x = self.residual(x, h)
        h = self.mlp(i, self.norm(x, p + "ffn_norm.weight") if fam.pre_norms else x)
        if fam.post_norms:
            h = self.norm(h, p + "post_ffw_norm.weight")
        return self.residual(x, h)

    def residual(self, x, h):
        """x + h, h first multiplied by Granite's residual multiplier."""
        if self.cfg.residual_scale != 1.0:
            h = self.ops.scale(h, self.cfg.residual_scale)
        return self.ops.add(x, h)

    def mlp(self, i: int, x):
        w, ops, p, cfg = self.w, self.ops, f"blk.{i}.", self.cfg
        if cfg.experts:
            return ops.moe(x, w[p + "ffn_gate_inp.weight"], w[p + "ffn_gate_exps.weight"],
                           w[p + "ffn_up_exps.weight"], w[p + "ffn_down_exps.weight"],
                           cfg.experts.used, cfg.experts.norm, cfg.family.act)
        if cfg.family.fused_qkv:           # Phi-3: ffn_up holds gate|up
            gate_up = ops.linear(x, w[p + "ffn_up.weight"])
        else:
            gate_up = ops.linear(x, [w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"]])
        act = ops.gated_act(gate_up, cfg.family.act)
        return ops.linear(act, w[p + "ffn_down.weight"])

    def qkv(self, i: int, x):
        """The q|k|v projection, (T, d) -> (T, (H + 2 KV) * head_dim)."""
        w, ops, p, fam = self.w, self.ops, f"blk.{i}.", self.cfg.family
        if fam.fused_qkv:
            qkv = ops.linear(x, w[p + "attn_qkv.weight"])
        else:
            qkv = ops.linear(x, [w[p + "attn_q.weight"], w[p + "attn_k.weight"],
                                 w[p + "attn_v.weight"]])
        if fam.qkv_bias:
            qkv = ops.bias(qkv, [w[p + "attn_q.bias"], w[p + "attn_k.bias"], w[p + "attn_v.bias"]])
        return qkv

    def attention(self, i: int, x, rope, meta: AttentionMetadata, kv_cache):
        """rope: this step's tables per rotary variant. (T, d) -> (T, d)."""
        cfg, w, p, ops = self.cfg, self.w, f"blk.{i}.", self.ops
        variant = cfg.layer_rope[i]
        cos, sin = rope[variant] if variant >= 0 else (None, None)   # None: no rotary
        k_cache, v_cache = kv_cache
        group = cfg.layer_kv_group(i)
        # q/k norms (per head or over the projection), rotary, and k/v into the paged cache
        q = ops.qkv_rope_cache(self.qkv(i, x), w.get(p + "attn_q_norm.weight"),
                               w.get(p + "attn_k_norm.weight"), cfg.rms_eps, cos, sin,
                               cfg.family.rope_neox, cfg.n_heads, k_cache, v_cache,
                               meta.slot_mappings[group])
        o = ops.attention(q, k_cache, v_cache, meta.tables[group], meta.seq_meta,
                          cfg.attn_scale, cfg.window(i), cfg.attn_softcap)
        return ops.linear(o, w[p + "attn_output.weight"])
