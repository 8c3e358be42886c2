"""Dequantize GGUF tensor bytes to float32 with vectorized numpy.

Every kernel performs the same float32 operations, in the same order, as the reference
dequantizers of the `gguf` Python package (which mirror ggml's C code), so results are
bit-for-bit identical, including the sign of zero. Integer quants are converted to float32
exactly; the only roundings are the products and sums spelled out in each kernel:

    Q4_0, Q5_0, Q8_0:  d * q                      (q signed)
    Q4_1, Q5_1:        (d * q) + m
    Q4_K, Q5_K:        (d * sc) * q - (dmin * mn)  (sc, mn: 6-bit sub-block scale / min)
    Q6_K:              (d * sc) * q                 (sc: int8 sub-block scale)

where d, m, dmin are the block's fp16 fields widened to float32.

Blocks are processed in chunks of about `_CHUNK_ELEMS` outputs so temporaries stay a few
MB no matter how big the tensor is; each kernel writes straight into its slice of the result.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .gguf import GGML_TYPES, GGUFError, GGUFFile

_CHUNK_ELEMS = 1 << 20  # outputs per chunk: ~4 MB of float32 plus similar-sized temporaries

# A kernel takes blocks (n, bytes_per_block) uint8 and fills out (n, elems_per_block) float32.
Kernel = Callable[[np.ndarray, np.ndarray], None]


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 field at byte `start` of each block, as float32 of shape (n, 1)."""
    field = np.ascontiguousarray(blocks[:, start:start + 2])
    return field.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) packed bytes -> (..., 2, k) uint8: low nibbles first, then high nibbles."""
    out = np.empty(qs.shape[:-1] + (2, qs.shape[-1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


def _bits_le(packed: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) uint8 0/1, bit i of the little-endian integer at index i."""
    return np.unpackbits(packed, axis=1, bitorder="little")


# ---- plain float types -------------------------------------------------------------------

def _deq_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:] = np.ascontiguousarray(blocks).view("<f4")  # a byte copy: NaN payloads survive


def _deq_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:] = np.ascontiguousarray(blocks).view("<f2")  # exact widening cast


def _deq_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    # bf16 is the top half of a float32: shift its bits into place.
    bits = np.ascontiguousarray(blocks).view("<u2").astype(np.uint32) << 16
    out[:] = bits.view(np.float32)


# ---- 32-element blocks -------------------------------------------------------------------
# Layout of the packed 4-bit part (16 bytes): element j < 16 is the low nibble of byte j,
# element 16 + j the high nibble of byte j. The 5-bit types add bit j of a u32 `qh` as bit 4.

def _deq_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:   # d:f16 | qs:16
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).reshape(-1, 32).view(np.int8) - np.int8(8)
    np.multiply(d, q, out=out)


def _deq_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:   # d:f16 | m:f16 | qs:16
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:20]).reshape(-1, 32)
    np.multiply(d, q, out=out)
    out += m


def _q5(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Five-bit codes 0..31 of shape (n, 32) from 16 nibble bytes and 4 high-bit bytes."""
    return _nibbles(qs).reshape(-1, 32) | (_bits_le(qh) << 4)


def _deq_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:   # d:f16 | qh:u32 | qs:16
    d = _f16(blocks, 0)
    q = _q5(blocks[:, 6:22], blocks[:, 2:6]).view(np.int8) - np.int8(16)
    np.multiply(d, q, out=out)


def _deq_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:   # d:f16 | m:f16 | qh:u32 | qs:16
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _q5(blocks[:, 8:24], blocks[:, 4:8])
    np.multiply(d, q, out=out)
    out += m


def _deq_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:   # d:f16 | qs:int8 x 32
    np.multiply(_f16(blocks, 0), blocks[:, 2:34].view(np.int8), out=out)


# ---- 256-element K-quant super-blocks ----------------------------------------------------

def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte field of Q4_K/Q5_K into eight 6-bit scales and mins, each (n, 8).

    Sub-blocks 0..3 keep scale/min in the low 6 bits of bytes 0..3 / 4..7. Sub-blocks 4..7
    take their low 4 bits from the nibbles of bytes 8..11 (scale: low, min: high) and their
    top 2 bits from the spare top bits of bytes 0..3 (scale) / 4..7 (min).
    """
    lo_sc, lo_mn, packed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (packed & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_mn & 0x3F, (packed >> 4) | ((lo_mn >> 6) << 4)], axis=1)
    return sc, mn


def _k_affine(blocks: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """out = (d * sc) * q - (dmin * mn) per 32-element sub-block; q is (n, 8, 32) uint8."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    scale = (d * sc)[:, :, None]         # (n, 8, 1) float32, rounded once like the reference
    offset = (dmin * mn)[:, :, None]
    o = out.reshape(-1, 8, 32)
    np.multiply(scale, q, out=o)
    np.subtract(o, offset, out=o)


def _deq_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:  # d | dmin | scales:12 | qs:128
    # Each 32-byte run of qs holds two sub-blocks: low nibbles, then high nibbles.
    q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    _k_affine(blocks, q, out)


def _deq_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:  # d|dmin|scales:12|qh:32|qs:128
    low = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    # Bit s of qh[l] is bit 4 of element l of sub-block s.
    qh = blocks[:, 16:48]
    high = np.stack([(qh >> s) & 1 for s in range(8)], axis=1)          # (n, 8, 32)
    _k_affine(blocks, low | (high << 4), out)


def _deq_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:  # ql:128 | qh:64 | sc:int8 16 | d
    # Two halves of 128 elements. In half h, 32-element group g (0..3) takes its low 4 bits
    # from ql[64h + 32(g%2) : +32] (low nibble if g < 2, else high) and its top 2 bits from
    # bits 2g..2g+1 of qh[32h : 32h+32].
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)  # g = 2*nib + sub
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n, 2, 4, 32)
    q = (low | (high << 4)).view(np.int8) - np.int8(32)
    scale = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8)        # (n, 16) float32
    np.multiply(scale[:, :, None], q.reshape(n, 16, 16), out=out.reshape(n, 16, 16))


_KERNELS: dict[str, Kernel] = {
    "F32": _deq_f32, "F16": _deq_f16, "BF16": _deq_bf16,
    "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1,
    "Q8_0": _deq_q8_0, "Q4_K": _deq_q4_k, "Q5_K": _deq_q5_k, "Q6_K": _deq_q6_k,
}


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a tensor's raw bytes (ggml type `type_id`) into float32 of `shape` (numpy order).

    Raises ValueError for an unknown type, a row not made of whole blocks, or a byte count
    that does not match the shape.
    """
    if type_id not in GGML_TYPES:
        known = ", ".join(f"{name}={tid}" for tid, (name, _, _) in GGML_TYPES.items())
        raise ValueError(f"cannot dequantize ggml type id {type_id}: unsupported (known: {known})")
    tname, block, bsize = GGML_TYPES[type_id]
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 0:
        raise ValueError(f"invalid tensor shape {shape}")
    if shape[-1] % block:
        raise ValueError(f"{tname} tensor of shape {shape}: row length {shape[-1]} is not a "
                         f"multiple of the block size {block}")
    n_elems = math.prod(shape)
    n_blocks = n_elems // block
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != n_blocks * bsize:
        raise ValueError(f"{tname} tensor of shape {shape} needs {n_blocks * bsize} uint8 bytes, "
                         f"got {raw.size} of dtype {raw.dtype}")
    blocks = raw.reshape(n_blocks, bsize)
    out = np.empty((n_blocks, block), dtype=np.float32)
    kernel = _KERNELS[tname]
    step = max(1, _CHUNK_ELEMS // block)
    for start in range(0, n_blocks, step):
        kernel(blocks[start:start + step], out[start:start + step])
    return out.reshape(shape)


def load_tensor(gf: GGUFFile, name: str) -> np.ndarray:
    """The named tensor of an open GGUF file, dequantized to float32 in its numpy-order shape."""
    info = gf.tensors.get(name)
    if info is None:
        raise GGUFError(f"{gf.path}: no tensor named {name!r}")
    return dequantize(gf.raw(name), info.type_id, info.shape)
