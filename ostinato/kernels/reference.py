"""The same ops on plain torch (MKL/oneDNN fp32 GEMM, SDPA): fast for prefill, but a row's
result depends on the batch shape. Kept to measure what batch invariance costs
(`ostinato bench --backend torch`) and as a readable reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..loader.weights import LogicalTensor, Progress, convert_each
from .repack import repack_raw


class TorchOps:
    def load_weights(self, tensors: dict[str, LogicalTensor], groups: list[tuple[str, ...]],
                     progress: Progress | None = None) -> tuple[dict, list[str]]:
        """Every tensor as float32 with the values the quantized kernels multiply by
        (nothing is stacked: torch's GEMMs gain little from it)."""
        weights = convert_each(tensors, _dense, lambda t: torch.from_numpy(t.dequantize()), progress)
        return weights, []

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    def linear(self, x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, list):
            y = torch.cat([F.linear(x, part) for part in w], dim=-1)
        else:
            y = F.linear(x, w)
        return y if out is None else out.copy_(y)

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h

    def bias(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return x + torch.cat(parts)

    def scale(self, x: torch.Tensor, s: float) -> torch.Tensor:
        return x * s

    def moe(self, x, router, gate, up, down, k: int, norm: bool, act: str) -> torch.Tensor:
        """Softmax over the router's logits, the top k, renormalised where norm; each token's
        experts' gated MLPs weighted and summed."""
        probs = torch.softmax(F.linear(x, router), dim=-1)
        wts, picks = probs.topk(k, dim=-1)
        if norm:
            wts = wts / wts.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in picks.unique().tolist():
            rows, slot = (picks == e).nonzero(as_tuple=True)
            h = self.gated_act(torch.cat([F.linear(x[rows], gate[e]), F.linear(x[rows], up[e])], -1), act)
            out.index_add_(0, rows, F.linear(h, down[e]) * wts[rows, slot, None])
        return out

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def gated_act(self, gate_up: torch.Tensor, act: str) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        g = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
        return g * up

    def qkv_rope_cache(self, qkv, q_norm, k_norm, eps, cos, sin, neox, n_heads, k_cache, v_cache,
                       slots) -> torch.Tensor:
        n_kv, d = k_cache.shape[2], k_cache.shape[3]
        q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
        q, k, v = q.reshape(-1, n_heads, d), k.reshape(-1, n_kv, d), v.reshape(-1, n_kv, d)
        if q_norm is not None:
            q, k = _norm(self, q, q_norm, eps), _norm(self, k, k_norm, eps)
        if cos is not None:
            q, k = apply_rope(q, cos, sin, neox), apply_rope(k, cos, sin, neox)
        write_kv(k_cache, v_cache, k, v, slots)
        return q.reshape(q.shape[0], -1)

    # -- the KV cache: float32, (blocks, block_size, kv_heads, head_dim) for K and V --------
    @staticmethod
    def new_kv_cache(num_blocks: int, block_size: int, n_kv: int, head_dim: int):
        shape = (num_blocks, block_size, n_kv, head_dim)
        k, v = torch.empty(shape), torch.empty(shape)
        k[0].zero_(), v[0].zero_()          # the null block: gathered as padding
        return k, v

    @staticmethod
    def kv_cache_bytes(block_size: int, n_kv: int, head_dim: int) -> int:
        return 2 * block_size * n_kv * head_dim * 4

    @staticmethod
    def write_kv(k_cache, v_cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_kv(k_cache, v_cache, k, v, slots)

    @staticmethod
    def read_kv(k_cache, v_cache, slots: torch.Tensor):
        n_kv, d = k_cache.shape[2], k_cache.shape[3]
        return k_cache.view(-1, n_kv, d)[slots], v_cache.view(-1, n_kv, d)[slots]

    def attention(self, q, k_cache, v_cache, tables, seq_meta, scale, window,
                  softcap: float = 0.0) -> torch.Tensor:
        """q: (T, H * D); per sequence, gather its keys through its block table and run SDPA."""
        n_kv, d = k_cache.shape[2], k_cache.shape[3]
        q = q.reshape(q.shape[0], -1, d)
        out = torch.empty_like(q)
        for table, (q_start, q_len, ctx) in zip(tables, seq_meta.tolist()):
            k = k_cache[table].view(-1, n_kv, d)[:ctx].transpose(0, 1)    # (KV, S, D)
            v = v_cache[table].view(-1, n_kv, d)[:ctx].transpose(0, 1)
            qs = q[q_start: q_start + q_len].transpose(0, 1)               # (H, L, D)
            mask = _mask(q_len, ctx, window)
            if softcap:
                o = _softcapped_attention(qs, k, v, mask, scale, softcap)
            else:
                o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            out[q_start: q_start + q_len] = o.transpose(0, 1)
        return out.reshape(out.shape[0], -1)


def _mask(q_len: int, context_len: int, window: int | None) -> torch.Tensor:
    # (q_len, context_len) bool, True = attend; query i sits at context_len - q_len + i
    q_pos = torch.arange(context_len - q_len, context_len).unsqueeze(1)
    k_pos = torch.arange(context_len).unsqueeze(0)
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def _dense(t):
    """A matrix, or a stack of expert matrices, as float32 (the values the kernels use)."""
    if len(t.shape) == 2:
        return torch.from_numpy(repack_raw(t.raw, t.type_name, *t.shape).dequantize())
    E, N, K = t.shape
    raw = t.raw.reshape(E, -1)
    return [torch.from_numpy(repack_raw(raw[e], t.type_name, N, K).dequantize()) for e in range(E)]


def _norm(ops, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (T, heads, D): per head (w of D) or over all heads together (w of heads * D)."""
    if w.numel() == x.shape[-1]:
        return ops.rms_norm(x, w, eps)
    return ops.rms_norm(x.reshape(x.shape[0], -1), w, eps).view_as(x)


def _softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """q (H, L, D), k/v (KV, S, D): scores -> cap * tanh(scores / cap), then softmax."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = torch.tanh(q @ k.transpose(1, 2) * scale / cap) * cap
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: (T, H, D), the first R = 2 * cos.shape[-1] dims rotated (the rest pass). neox
    rotates the two halves of R; otherwise adjacent pairs (GGUF llama, whose q/k weights were
    permuted by the converter for that layout)."""
    R = 2 * cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :R], cos, sin, neox), x[..., R:]], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                      # (T, 1, R/2)
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v: (T, n_kv, D)
    n_kv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, n_kv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, n_kv, d).index_copy_(0, slot_mapping, v)
