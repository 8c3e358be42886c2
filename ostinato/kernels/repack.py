"""Repack GGUF weight blocks, once at load, into the three layouts the kernels read.

    F32: (N, K) float32                                   value = w
    Q8:  (N, K) int8 codes, per-block scale (and min)     value = scale * q + min
    Q4:  (N, K/2) nibbles, per-32 scale (and min), zp     value = scale * (q - zp) + min
    Q5:  (N, K/32 * 20) 5-bit codes, per-32 scale (and min), zp: as Q4

Q4 packing per 32-element block: byte j holds element j (low nibble) and j+16 (high).
Q5 per 32-element block: those 16 bytes, then a little-endian uint32 whose bit j is bit 4
of element j (GGUF's own Q5_0/Q5_1 bits, reordered): 5.5 bits a weight with a half scale,
where int8 codes would read 8.5.
Every GGUF type maps onto one of these exactly (integer codes, scales computed in float32
the way the reference dequantizer computes them); the kernels then never branch on type.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..loader import dequant as dq
from ..loader.gguf import GGML_TYPES, TYPE_IDS, GGUFFile

F32, Q8, Q4, Q5 = 0, 1, 2, 3


@dataclass
class Packed:
    fmt: int
    bs: int                   # elements per scale block
    zp: int                   # Q4 zero point (integer, subtracted before scaling)
    q: np.ndarray
    scale: np.ndarray | None  # (N, K // bs) float32; K-quants: int8 multipliers of scale_d
    min: np.ndarray | None    # (N, K // bs) float32 or None; K-quants: int8 of min_d
    N: int
    K: int
    # K-quants: the super-blocks' halves (N, K // 256) (d; -dmin for the mins): a block's
    # scale is the float32 product scale_d * scale, as the format defines it
    scale_d: np.ndarray | None = None
    min_d: np.ndarray | None = None

    def values(self, sub: np.ndarray | None, d: np.ndarray | None) -> np.ndarray | None:
        """Per-block float32 values: sub itself, or d (per super-block) times sub."""
        if sub is None or d is None:
            return sub
        return np.repeat(d, sub.shape[1] // d.shape[1], axis=1) * sub.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """Reference values (for tests): what the kernels multiply with."""
        if self.fmt == F32:
            return self.q
        q = (_unpack_q4(self.q, self.K) if self.fmt == Q4 else
             unpack_q5(self.q, self.K) if self.fmt == Q5 else self.q)
        vals = (q.astype(np.int32) - self.zp).astype(np.float32).reshape(self.N, -1, self.bs)
        out = vals * self.values(self.scale, self.scale_d)[:, :, None]
        if self.min is not None:
            out += self.values(self.min, self.min_d)[:, :, None]
        return out.reshape(self.N, self.K)


def _unpack_q4(packed: np.ndarray, K: int) -> np.ndarray:
    b = packed.reshape(packed.shape[0], K // 32, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(packed.shape[0], K)


def _pack_q5(codes: np.ndarray) -> np.ndarray:
    """codes: (N, K) uint8 0..31 -> (N, K/32 * 20): per block Q4's 16 nibble bytes of the low
    bits, then 4 bytes holding bit 4 of elements 0..31 (little-endian)."""
    N, K = codes.shape
    nib = _pack_q4(codes & 0x0F).reshape(N, K // 32, 16)
    high = np.packbits((codes >> 4).reshape(N, K // 32, 32), axis=2, bitorder="little")
    return np.ascontiguousarray(np.concatenate([nib, high], axis=2).reshape(N, -1))


def unpack_q5(packed: np.ndarray, K: int) -> np.ndarray:
    b = packed.reshape(packed.shape[0], K // 32, 20)
    low = np.concatenate([b[:, :, :16] & 0x0F, b[:, :, :16] >> 4], axis=2)
    high = np.unpackbits(b[:, :, 16:], axis=2, bitorder="little")
    return (low | (high << 4)).reshape(packed.shape[0], K)


def _pack_q4(codes: np.ndarray) -> np.ndarray:
    # codes: (N, K) uint8 0..15 -> (N, K/2)
    b = codes.reshape(codes.shape[0], -1, 2, 16)
    return (b[:, :, 0, :] | (b[:, :, 1, :] << 4)).reshape(codes.shape[0], -1)


def _blocks(raw: np.ndarray, type_name: str, N: int) -> np.ndarray:
    return raw.reshape(-1, GGML_TYPES[TYPE_IDS[type_name]][2])


def _rows(x: np.ndarray, N: int) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(N, -1))


def _q4_0(b, N, K):
    codes = dq._nibbles(b[:, 2:18]).reshape(-1, 32)
    return Packed(Q4, 32, 8, _pack_q4(_rows(codes, N)), _rows(dq._f16(b, 0), N), None, N, K)


def _q4_1(b, N, K):
    codes = dq._nibbles(b[:, 4:20]).reshape(-1, 32)
    return Packed(Q4, 32, 0, _pack_q4(_rows(codes, N)), _rows(dq._f16(b, 0), N),
                  _rows(dq._f16(b, 2), N), N, K)


def _q5_0(b, N, K):
    codes = _rows(dq._q5(b[:, 6:22], b[:, 2:6]), N)
    return Packed(Q5, 32, 16, _pack_q5(codes), _rows(dq._f16(b, 0), N), None, N, K)


def _q5_1(b, N, K):
    codes = _rows(dq._q5(b[:, 8:24], b[:, 4:8]), N)
    return Packed(Q5, 32, 0, _pack_q5(codes), _rows(dq._f16(b, 0), N), _rows(dq._f16(b, 2), N),
                  N, K)


def _q8_0(b, N, K):
    return Packed(Q8, 32, 0, _rows(b[:, 2:34].view(np.int8), N), _rows(dq._f16(b, 0), N),
                  None, N, K)


def _k_packed(fmt, codes, b, N, K) -> Packed:
    """Q4_K / Q5_K: codes with each 32-block's 6-bit scale and min (int8) under the
    super-block's d and -dmin (halves): scale = d * sc, min = -dmin * mn, the float32
    products the reference dequantizer forms."""
    d, dmin = dq._f16(b, 0), dq._f16(b, 2)
    sc, mn = dq._k_scales_mins(b[:, 4:16])
    return Packed(fmt, 32, 0, codes, _rows(sc.astype(np.int8), N), _rows(mn.astype(np.int8), N),
                  N, K, _rows(d, N), _rows(-dmin, N))


def _q4_k(b, N, K):
    codes = dq._nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 32)   # (n*8, 32)
    return _k_packed(Q4, _pack_q4(_rows(codes, N)), b, N, K)


def _q5_k(b, N, K):
    low = dq._nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = np.stack([(b[:, 16:48] >> s) & 1 for s in range(8)], axis=1)
    return _k_packed(Q5, _pack_q5(_rows(low | (high << 4), N)), b, N, K)


def _q6_k(b, N, K):
    n = b.shape[0]
    low = dq._nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = (low | (high << 4)).view(np.int8) - np.int8(32)
    # each 16-block's int8 scale under the super-block's d: scale = d * sc (float32)
    return Packed(Q8, 16, 0, _rows(q, N), _rows(b[:, 192:208].view(np.int8), N), None, N, K,
                  _rows(dq._f16(b, 208), N))


_REPACK = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
           "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def repack(gf: GGUFFile, name: str) -> Packed:
    info = gf.tensors[name]
    return repack_raw(gf.raw(name), info.type_name, *info.shape)


def repack_raw(raw: np.ndarray, type_name: str, N: int, K: int) -> Packed:
    """raw: the tensor's GGUF bytes; (N, K) its shape in numpy order."""
    if K % 32:
        raise ValueError(f"cannot repack a {N}x{K} matrix: rows must be a multiple of 32")
    if type_name in _REPACK:
        return _REPACK[type_name](_blocks(raw, type_name, N), N, K)
    w = dq.dequantize(raw, TYPE_IDS[type_name], (N, K))           # F32 / F16 / BF16: exact in float32
    return Packed(F32, 32, 0, np.ascontiguousarray(w), None, None, N, K)
