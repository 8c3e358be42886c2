"""The ops a model calls, on the batch-invariant C++ kernels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..loader.weights import LogicalTensor, Progress, convert_each
from . import ops
from .repack import F32, Q5, Packed, unpack_q5, repack_raw


EMPTY = torch.empty(0)      # an absent optional weight (no min, no q/k norm)


def by_fours(t: torch.Tensor) -> torch.Tensor:
    """(N, nb) per-row block values -> (ceil(N/4), nb, 4): four weight rows side by side, the
    layout the kernels read scales and mins in (rows past N are zero)."""
    N, nb = t.shape
    padded = torch.zeros(-(-N // 4) * 4, nb, dtype=t.dtype)
    padded[:N] = t
    return padded.view(-1, 4, nb).transpose(1, 2).contiguous()


def _exact_half(*arrays) -> bool:
    """Whether every value is exactly a float16 (then half the bytes carry the same values)."""
    return all(a is None or np.array_equal(a.astype(np.float16).astype(np.float32), a)
               for a in arrays)


@dataclass
class QWeight:
    """A repacked weight as torch tensors, ready for `qlinear`."""
    fmt: int
    bs: int
    zp: int
    q: torch.Tensor
    scale: torch.Tensor        # by_fours layout: (ceil(N/4), K // bs, 4)
    min: torch.Tensor          # the same layout; empty when the format has no min
    N: int
    K: int
    # K-quants: scale and min are int8 multipliers of these halves, one per super-block
    # (by fours of rows: (ceil(N/4), K // 256, 4)); empty otherwise
    scale_d: torch.Tensor = EMPTY
    min_d: torch.Tensor = EMPTY

    @classmethod
    def from_packed(cls, p: Packed) -> "QWeight":
        """Scales and mins go by fours of rows, in float16 when that is exact (GGUF stores
        Q4_0/Q4_1/Q5_x/Q8_0 scales as halves), K-quants' as int8 under their super-blocks'
        halves (the format's own two levels)."""
        if p.scale_d is not None:
            fours = lambda t, dt: by_fours(torch.from_numpy(t.astype(dt))) if t is not None else EMPTY  # noqa: E731
            return cls(p.fmt, p.bs, p.zp, torch.from_numpy(p.q), fours(p.scale, np.int8),
                       fours(p.min, np.int8), p.N, p.K, fours(p.scale_d, np.float16),
                       fours(p.min_d, np.float16))
        dtype = np.float16 if p.scale is not None and _exact_half(p.scale, p.min) else np.float32

        def fours(t):
            return by_fours(torch.from_numpy(t.astype(dtype))) if t is not None else EMPTY
        return cls(p.fmt, p.bs, p.zp, torch.from_numpy(p.q), fours(p.scale), fours(p.min),
                   p.N, p.K)

    @staticmethod
    def stack(parts: list["QWeight"]) -> "QWeight | None":
        """Stack weights along N (one matmul for q|k|v or gate|up); None if their layouts
        differ (or a part's rows don't fill its fours). Every output element is computed
        exactly as before: only the call is shared."""
        a = parts[0]
        layout = lambda p: (p.fmt, p.bs, p.zp, p.K, bool(p.min.numel()), p.scale.dtype,  # noqa: E731
                            p.scale_d.shape[1:])
        if any(layout(p) != layout(a) or p.N % 4 for p in parts):
            return None
        cat = lambda ts: torch.cat(ts) if ts[0].numel() else ts[0]  # noqa: E731
        return QWeight(a.fmt, a.bs, a.zp, cat([p.q for p in parts]),
                       cat([p.scale for p in parts]), cat([p.min for p in parts]),
                       sum(p.N for p in parts), a.K, cat([p.scale_d for p in parts]),
                       cat([p.min_d for p in parts]))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.q, self.scale, self.min, self.scale_d, self.min_d))

    @staticmethod
    def _row(fours: torch.Tensor, ids: torch.Tensor, d: torch.Tensor = EMPTY) -> torch.Tensor:
        """Rows `ids` of per-block values (T, nb, 1): K-quants' d * sub as the kernels form it."""
        vals = fours[ids // 4, :, ids % 4].float()
        if d.numel():
            sup = d[ids // 4, :, ids % 4].float()
            vals = sup.repeat_interleave(vals.shape[1] // sup.shape[1], dim=1) * vals
        return vals.unsqueeze(-1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows (an embedding lookup): (T,) -> (T, K) float32."""
        if self.fmt == F32:
            return self.q[ids]
        q = self.q[ids]
        if self.fmt == Q5:  # 16 nibble bytes and 4 bytes of bit 4 per 32-block
            q = torch.from_numpy(unpack_q5(q.numpy(), self.K)).to(torch.int32) - self.zp
        elif self.fmt != 1:   # Q4: unpack nibbles of each 32-block
            q = q.view(len(ids), -1, 16)
            q = torch.cat([q & 0x0F, q >> 4], dim=2).to(torch.int32) - self.zp
        vals = (q.reshape(len(ids), -1, self.bs).to(torch.float32)
                * self._row(self.scale, ids, self.scale_d))
        if self.min.numel():
            vals = vals + self._row(self.min, ids, self.min_d)
        return vals.reshape(len(ids), self.K)


# --kv-cache-dtype -> (keys, values). int8 keys were measured and left out: per token and
# KV head (and per 16 or 32 dimensions) they cost Qwen2.5-Coder 3-5 points of top-1 agreement
# with llama.cpp and 1.3-2.8% perplexity (its key channels with outliers); int8 values 0.2
# points.
KV_DTYPES = {"float16": (torch.float16, torch.float16), "float32": (torch.float32, torch.float32),
             "int8-values": (torch.float16, torch.int8)}


V_BLOCK = 16                    # int8 values: dimensions a scale


def v_scale_rows(block_size: int) -> int:
    """int8 values: the rows of head_dim bytes after a block's codes that hold its scales
    (4 bytes a V_BLOCK dimensions of each slot)."""
    return block_size * 4 // V_BLOCK


def kv_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values: x (..., D) float32 as codes round(x * 127 / max|x|) and scales
    max|x| / 127 over each V_BLOCK dimensions, (..., D) and (..., D / V_BLOCK): the arithmetic
    of csrc/norm_rope.h's kv_quantize, to the bit (a V_BLOCK with a NaN or an infinity: codes
    0, scale NaN)."""
    xb = x.unflatten(-1, (-1, V_BLOCK))
    finite = xb.isfinite().all(-1, keepdim=True)      # else codes 0 and a NaN scale
    xb = torch.where(finite, xb, torch.zeros_like(xb))
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    inv = torch.where(inv.isinf(), torch.zeros_like(inv), inv)   # amax below 127 / FLT_MAX
    codes = torch.round(xb * inv).to(torch.int8).flatten(-2)
    scales = torch.where(finite, amax / torch.tensor(127.0), torch.tensor(float("nan")))
    return codes, scales.squeeze(-1)


class CpuKernels:
    """quantize_activations: quantize activations to int16 per 32 elements and take exact
    integer dot products with the quantized weights; False keeps them in float32.
    kv_cache_dtype: "float16" (llama.cpp's default: half the memory and bandwidth),
    "float32" (keys and values exactly as computed) or "int8-values" (float16 keys; values
    as 8-bit codes and a float32 scale per V_BLOCK dimensions: 13/16 of float16's memory and
    bytes read by attention)."""

    native_out = True               # linear(..., out=) writes into out (no copy)

    def __init__(self, quantize_activations: bool = True, kv_cache_dtype: str = "float16"):
        if kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, "
                             f"got {kv_cache_dtype!r}")
        self.ops = ops()
        self.quantize_activations = quantize_activations
        self.k_dtype, self.v_dtype = KV_DTYPES[kv_cache_dtype]
        self._held: dict[int, tuple[QWeight, object]] = {}   # id(weight) -> (it, its QW)

    # -- weights: the backend owns their layout ------------------------------------------
    def load_weights(self, tensors: dict[str, LogicalTensor], groups: list[tuple[str, ...]],
                     progress: Progress | None = None) -> tuple[dict, list[str]]:
        """Logical tensors -> this backend's weights: vectors as float32 tensors, matrices
        repacked for the quantized kernels, and each group of matrices that the decoder
        multiplies by the same input (q|k|v, gate|up) stacked into one where their layouts
        agree. Returns the weights and a line per group that could not be stacked (it then
        costs a matmul per part and a copy: the caller says so in the log)."""
        weights = convert_each(tensors, _repack, lambda t: torch.from_numpy(t.dequantize()),
                               progress)
        return weights, stack_groups(weights, groups, {n: t.type_name for n, t in tensors.items()})

    def pack_bf16(self, w) -> bool:
        """From now on every row that `linear` multiplies by w takes AMX bfloat16 tiles, the
        weight converted once, here (--dtype bfloat16's LM head; the plan packs its own
        weights). False, and nothing changes, for a weight the tiles do not take (float32,
        a stacked part)."""
        if not isinstance(w, QWeight) or w.fmt == F32 or not self.quantize_activations:
            return False
        self._qw(w).pack_bf16()
        return True

    def _qw(self, w: QWeight):
        """w's QW, kept (with w, so that its id stays w's) for the weights multiplied through
        linear_into: a packed one, or one whose product goes into a kept buffer."""
        held = self._held.get(id(w))
        if held is None:
            held = self._held[id(w)] = (w, qw_of(w))
        return held[1]

    def embed(self, table: QWeight, ids: torch.Tensor) -> torch.Tensor:
        return table.rows(ids)

    def linear(self, x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, K) times one weight, or a list of weights whose outputs are concatenated
        (one stacked matmul where load_weights stacked them). out: a (T, N) float32 tensor
        to write into (one weight only), instead of a new one."""
        if isinstance(w, list):
            stacked = stacked_of(w)
            if stacked is None:
                if out is not None:
                    raise ValueError("linear: out= takes one weight, not a list of parts")
                return torch.cat([self.linear(x, part) for part in w], dim=-1)
            w = stacked
        if isinstance(w, StackedPart):
            raise ValueError("a stacked weight's part cannot be multiplied on its own")
        if out is not None or id(w) in self._held:
            x2 = x.reshape(-1, w.K).contiguous()
            y = out if out is not None else torch.empty(len(x2), w.N)
            self.ops.linear_into(x2, self._qw(w), y, int(self.quantize_activations))
            return y if out is not None else y.view(*x.shape[:-1], w.N)
        y = self.ops.qlinear(x.reshape(-1, w.K).contiguous(), w.q, w.scale, w.min, w.scale_d,
                             w.min_d, w.fmt, w.bs, w.zp, w.N, w.K, int(self.quantize_activations))
        return y.view(*x.shape[:-1], w.N)

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.rms_norm(x.contiguous(), w, eps)

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h

    def bias(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """x plus the biases of its parts side by side (one float add: the executor's bits)."""
        return x + torch.cat(parts)

    def scale(self, x: torch.Tensor, s: float) -> torch.Tensor:
        return x * torch.tensor(s, dtype=torch.float32)

    def moe(self, x, router: QWeight, gate: list, up: list, down: list[QWeight], k: int,
            norm: bool, act: str) -> torch.Tensor:
        """Routed experts (csrc/moe.h): x (T, d) -> (T, d)."""
        gate_up, up_ = expert_mats(gate, up)
        return self.ops.moe(x.contiguous(), qw_of(router), [qw_of(w) for w in gate_up],
                            [qw_of(w) for w in up_], [qw_of(w) for w in down], k, int(norm),
                            int(act != "silu"), int(self.quantize_activations))

    def gated_act(self, gate_up: torch.Tensor, act: str) -> torch.Tensor:
        """act(gate) * up, gate and up the two halves of each row (no copies)."""
        F = gate_up.shape[-1] // 2
        return self.ops.gated_act(gate_up[:, :F], gate_up[:, F:], int(act != "silu"))

    def qkv_rope_cache(self, qkv, q_norm, k_norm, eps, cos, sin, neox, n_heads, k_cache, v_cache,
                       slots) -> torch.Tensor:
        """q (T, n_heads * head_dim); k and v go into the cache."""
        if cos is None:                     # a layer without rotary
            cos = sin = EMPTY
        q = self.ops.qkv_rope_cache(qkv.contiguous(), EMPTY if q_norm is None else q_norm,
                                    EMPTY if k_norm is None else k_norm, eps, cos, sin,
                                    int(neox), n_heads, k_cache, v_cache, slots)
        return q.view(q.shape[0], -1)

    def attention(self, q, k_cache, v_cache, tables, seq_meta, scale, window,
                  softcap: float = 0.0) -> torch.Tensor:
        """q (T, H * D) -> (T, H * D)."""
        T, D = q.shape[0], v_cache.shape[-1]
        o = self.ops.paged_attention(q.reshape(T, -1, D).contiguous(), k_cache, v_cache, tables,
                                     seq_meta, scale, window or 0, softcap)
        return o.view(T, -1)

    # -- the KV cache: float16 (llama.cpp's default), float32 or int8 values, in the layout
    # attention reads. K: (blocks, kv_heads, head_dim, block_size), each block's keys
    # transposed, so one load brings a dimension of 16 keys and scores need no horizontal
    # sums; V: (blocks, kv_heads, block_size, head_dim). A KV head's share of a block is one
    # contiguous run either way. int8 values: each run's scales (head_dim / V_BLOCK a slot)
    # follow its codes, in v_scale_rows more rows (csrc/norm_rope.h).
    def new_kv_cache(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int):
        if block_size % 16 or head_dim % 16:
            raise ValueError(f"the CPU kernels need block_size and head_dim in multiples of 16, "
                             f"got {block_size} and {head_dim}")
        vr = self._v_rows(block_size)
        # empty, not zeros: attention reads only slots written before it, so the pages of
        # blocks never used are never touched and cost no resident memory
        k = torch.empty(num_blocks, n_kv, head_dim, block_size, dtype=self.k_dtype)
        v = torch.empty(num_blocks, n_kv, vr, head_dim, dtype=self.v_dtype)
        k[0].zero_(), v[0].zero_()          # the null block (padding in block tables)
        return k, v

    def _v_rows(self, block_size: int) -> int:
        """V's rows a KV head's block: its slots, and with int8 values their scales' rows."""
        return block_size + (v_scale_rows(block_size) if self.v_dtype == torch.int8 else 0)

    def kv_cache_bytes(self, block_size: int, n_kv: int, head_dim: int) -> int:
        """Bytes of one block of one layer, K and V (new_kv_cache's shapes)."""
        return n_kv * head_dim * (block_size * self.k_dtype.itemsize +
                                  self._v_rows(block_size) * self.v_dtype.itemsize)

    @staticmethod
    def _v_scales(v_cache: torch.Tensor, bs: int) -> torch.Tensor:
        """int8 values: the (blocks, kv_heads, bs, head_dim / V_BLOCK) float32 scales after
        each run's codes (a view: writes go into the cache)."""
        d = v_cache.shape[3]
        flat = v_cache.view(v_cache.shape[0], v_cache.shape[1], -1)
        return flat[..., bs * d:].view(torch.float32).unflatten(-1, (bs, d // V_BLOCK))

    @staticmethod
    def write_kv(k_cache, v_cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: (T, n_kv, head_dim) into their slots (rounded to the cache's dtype)."""
        bs, d = k_cache.shape[-1], v_cache.shape[-1]
        b, s = slots // bs, slots % bs
        k_cache[b, :, :, s] = k.to(k_cache.dtype)
        if v_cache.dtype != torch.int8:
            v_cache[b, :, s, :] = v.to(v_cache.dtype)
            return
        v_cache[b, :, s, :], CpuKernels._v_scales(v_cache, bs)[b, :, s] = kv_quantize(v.float())

    @staticmethod
    def read_kv(k_cache, v_cache, slots: torch.Tensor):
        """The keys and values at `slots` as (T, n_kv, head_dim) float32."""
        bs, d = k_cache.shape[-1], v_cache.shape[-1]
        b, s = slots // bs, slots % bs
        if v_cache.dtype != torch.int8:
            return k_cache[b, :, :, s].float(), v_cache[b, :, s, :].float()
        vs = CpuKernels._v_scales(v_cache, bs)[b, :, s]                   # (T, n_kv, d / V_BLOCK)
        return k_cache[b, :, :, s].float(), \
            (v_cache[b, :, s, :].float().unflatten(-1, (-1, V_BLOCK)) * vs[..., None]).flatten(-2)


@dataclass(frozen=True)
class StackedPart:
    """Part `index` of a stacked weight (load_weights stacked its group)."""
    stacked: QWeight
    index: int
    count: int


def stacked_of(parts: list) -> QWeight | None:
    """The stacked weight when `parts` are all of one stack's parts, in order; else None."""
    first = parts[0]
    if (isinstance(first, StackedPart) and len(parts) == first.count and
            all(isinstance(p, StackedPart) and p.stacked is first.stacked and p.index == i
                for i, p in enumerate(parts))):
        return first.stacked
    return None


def stack_groups(weights: dict, groups: list[tuple[str, ...]], types: dict[str, str]) -> list[str]:
    """Replace each group by parts of one stacked matrix where the layouts agree (identical
    results: every output element is computed as before, only the call is shared). Experts
    (lists of matrices) are stacked expert by expert, all of them or none."""
    unstacked = []
    for names in groups:
        if isinstance(weights[names[0]], list):
            per_expert = [QWeight.stack(list(ws)) for ws in zip(*(weights[n] for n in names))]
            ok = all(st is not None for st in per_expert)
            if ok:
                for i, n in enumerate(names):
                    weights[n] = [StackedPart(st, i, len(names)) for st in per_expert]
        else:
            stacked = QWeight.stack([weights[n] for n in names])
            ok = stacked is not None
            if ok:
                for i, n in enumerate(names):
                    weights[n] = StackedPart(stacked, i, len(names))
        if not ok:
            unstacked.append(f"{', '.join(names)} ({', '.join(types[n] for n in names)})")
    return unstacked


def expert_mats(gate: list, up: list) -> tuple[list[QWeight], list[QWeight]]:
    """(per expert gate|up stacked, []) where load_weights stacked them, else (gates, ups)."""
    stacked = [stacked_of([g, u]) for g, u in zip(gate, up)]
    if all(st is not None for st in stacked):
        return stacked, []
    return gate, up


def _repack(t: LogicalTensor):
    """A matrix as one QWeight; a stack of expert matrices (E, N, K) as a list of E."""
    if len(t.shape) == 2:
        return QWeight.from_packed(repack_raw(t.raw, t.type_name, *t.shape))
    E, N, K = t.shape
    raw = t.raw.reshape(E, -1)
    return [QWeight.from_packed(repack_raw(raw[e], t.type_name, N, K)) for e in range(E)]


def qw_of(w: QWeight):
    return ops().QW(w.q, w.scale, w.min, w.scale_d, w.min_d, w.fmt, w.bs, w.zp, w.N, w.K)


def make_ops(backend: str, kv_cache_dtype: str = "float16"):
    """"kernels": batch-invariant C++ (the default); "torch": MKL/SDPA, not batch-invariant
    (its cache is always float32)."""
    if backend == "kernels":
        return CpuKernels(kv_cache_dtype=kv_cache_dtype)
    if backend == "torch":
        if kv_cache_dtype == "int8-values":   # its cache is float32: it would ignore the choice
            raise ValueError("kv_cache_dtype 'int8-values' needs the kernels backend (the torch "
                             "backend's KV cache is always float32)")
        from .reference import TorchOps
        return TorchOps()
    raise ValueError(f"unknown backend {backend!r} (choose 'kernels' or 'torch')")
