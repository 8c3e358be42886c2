"""Quantize float32 rows into GGUF blocks with ggml's reference arithmetic (ggml-quants.c,
quantize_row_*_ref), so a folder quantized at load holds the very bytes llama.cpp would write.

Every step is float32, in ggml's order: the block's scale d is computed in float32, its
inverse id = 1/d (0 when d is 0) multiplies the values, and only the stored d (and m) are
rounded to fp16. Rounding is C's: roundf (halves away from zero) for Q8_0, and a truncating
int8 cast after adding an offset (8.5, 16.5 or 0.5) for the 4/5-bit types.

    Q8_0  d = amax/127            q = roundf(x*id)                       d:f16 | q:i8 x32
    Q4_0  d = max/-8              q = min(15, trunc(x*id + 8.5))         d:f16 | nibbles x16
    Q4_1  d = (max-min)/15        q = min(15, trunc((x-min)*id + 0.5))   d:f16 | m:f16 | nibbles
    Q5_0  d = max/-16             q = min(31, trunc(x*id + 16.5))        d:f16 | qh:u32 | nibbles
    Q5_1  d = (max-min)/31        q = trunc((x-min)*id + 0.5)            d:f16 | m:f16 | qh | nib.

(`max` in Q4_0/Q5_0 is the signed value of largest magnitude, the first one on ties.) Nibbles
pack element j in the low half and j+16 in the high half of byte j; qh bit j is bit 4 of
element j. K-quants are not implemented here (their search for scales is long); they are
refused by name.
"""
from __future__ import annotations

import numpy as np

QK = 32
_CHUNK_BLOCKS = 1 << 15         # blocks quantized at a time (1M values)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
TYPES = tuple(BLOCK_BYTES)          # what quantize() writes
NOT_IMPLEMENTED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS")


class QuantizeError(ValueError):
    pass


def check_type(type_name: str) -> str:
    """The GGML type name for a --quantize value ('q8_0' -> 'Q8_0'), or a one-line error."""
    t = type_name.upper()
    if t in BLOCK_BYTES:
        return t
    why = "K-quants are not implemented for quantizing at load" if t in NOT_IMPLEMENTED \
        else "unknown type"
    raise QuantizeError(f"--quantize {type_name!r}: {why} (available: "
                        f"{', '.join(x.lower() for x in TYPES)})")


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """(rows, cols) float32 -> (rows, cols/32*block bytes) uint8 blocks of `type_name`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] % QK:
        raise QuantizeError(f"a row of {x.shape[-1] if x.ndim else 0} values is not a multiple "
                            f"of the block size {QK}")
    blocks = x.reshape(-1, QK)
    out = np.empty((len(blocks), BLOCK_BYTES[type_name]), dtype=np.uint8)
    for start in range(0, len(blocks), _CHUNK_BLOCKS):     # temporaries stay a few MB
        out[start:start + _CHUNK_BLOCKS] = _KERNELS[type_name](blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * BLOCK_BYTES[type_name])


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: to nearest, halves away from zero (numpy's round goes to even)."""
    t = np.trunc(v)
    return t + np.copysign((np.abs(v - t) >= 0.5).astype(np.float32), v)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def _signed_max(blocks: np.ndarray) -> np.ndarray:
    """Per block, the value of largest magnitude (the first such on ties), shape (n, 1)."""
    idx = np.abs(blocks).argmax(axis=1)
    return blocks[np.arange(len(blocks)), idx][:, None]


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes: element j low, element j+16 high."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4) bytes: the little-endian u32 whose bit j is bit 4 of q[j]."""
    bits = ((q.astype(np.uint8) >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little")


def _trunc_codes(v: np.ndarray, hi: int | None) -> np.ndarray:
    q = np.trunc(v).astype(np.int32)        # the C cast to int8 truncates toward zero
    return np.minimum(q, hi) if hi is not None else q


def _q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    q = _roundf(b * _inverse(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _symmetric(b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (levels 16) and Q5_0 (32): the scale and the codes 0..levels-1."""
    d = _signed_max(b) / np.float32(-levels // 2)
    q = _trunc_codes(b * _inverse(d) + np.float32(levels // 2 + 0.5), levels - 1)
    return d, q


def _affine(b: np.ndarray, levels: int, clamp: bool) -> tuple[np.ndarray, ...]:
    """Q4_1 (levels 16) and Q5_1 (32): scale, minimum and codes."""
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(levels - 1)
    q = _trunc_codes((b - lo) * _inverse(d) + np.float32(0.5), levels - 1 if clamp else None)
    return d, lo, q


def _q4_0(b):
    d, q = _symmetric(b, 16)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)


def _q5_0(b):
    d, q = _symmetric(b, 32)
    return np.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


def _q4_1(b):
    d, lo, q = _affine(b, 16, clamp=True)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], axis=1)


def _q5_1(b):
    d, lo, q = _affine(b, 32, clamp=False)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _high_bits(q), _nibbles(q)], axis=1)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1}
