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
        dense = lambda t: torch.from_numpy(repack_raw(t.raw, t.type_name, *t.shape).dequantize())  # noqa: E731
        weights = convert_each(tensors, dense, lambda t: torch.from_numpy(t.dequantize()), progress)
        return weights, []

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, list):
            return torch.cat([F.linear(x, part) for part in w], dim=-1)
        return F.linear(x, w)

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h

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
            q, k = self.rms_norm(q, q_norm, eps), self.rms_norm(k, k_norm, eps)
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

    def attention(self, q, k_cache, v_cache, tables, seq_meta, scale, window) -> torch.Tensor:
        """q: (T, H * D); per sequence, gather its keys through its block table and run SDPA."""
        n_kv, d = k_cache.shape[2], k_cache.shape[3]
        q = q.reshape(q.shape[0], -1, d)
        out = torch.empty_like(q)
        for table, (q_start, q_len, ctx) in zip(tables, seq_meta.tolist()):
            k = k_cache[table].view(-1, n_kv, d)[:ctx].transpose(0, 1)    # (KV, S, D)
            v = v_cache[table].view(-1, n_kv, d)[:ctx].transpose(0, 1)
            qs = q[q_start: q_start + q_len].transpose(0, 1)               # (H, L, D)
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=_mask(q_len, ctx, window),
                                               scale=scale, enable_gqa=True)
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: (T, H, D). neox rotates the two halves of D; otherwise adjacent pairs (GGUF llama,
    whose q/k weights were permuted by the converter for that layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                      # (T, 1, D/2)
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
