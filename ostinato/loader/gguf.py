"""GGUF reader: header, metadata and tensor index, checked against the file's size.

Every count and length in the header is checked against the bytes that remain before
anything is allocated for it, so a forged or truncated file fails fast with `GGUFError`
(one line naming the file and the problem) instead of allocating or looping on trust.
Tensor data is memory-mapped, never read eagerly.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GGUFError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 8  # arrays of arrays nest this deep at most; bounds the parser's recursion

# ggml tensor types we can dequantize: id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

# metadata value types: id -> (struct format, size); 8 = string, 9 = array
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
               7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # numpy order (outermost first), e.g. (rows, cols) of a weight
    type_id: int
    offset: int                 # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    _mm: mmap.mmap | None = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident memory once it has been
        converted (the backend keeps its own layout): peak memory is then the converted
        weights plus one tensor, not the whole file on top. Pages read again come back from
        the file."""
        t = self.tensors[name]
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        except (OSError, ValueError):    # advice only: a kernel that declines changes nothing
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the mapping goes when they do
                pass
            self._mm = None


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size - self.pos} left")

    def scalar(self, fmt: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def count(self, what: str, min_item_size: int) -> int:
        n = self.u64(what)
        if n * min_item_size > self.size - self.pos:
            raise self.fail(f"forged or corrupt {what}: {n} items cannot fit in the "
                            f"{self.size - self.pos} bytes left")
        return n

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what=f"value of {key}")
        if vtype == _STRING:
            return self.string(f"value of {key}")
        if vtype == _ARRAY:
            return self.array(key)
        raise self.fail(f"unknown metadata value type {vtype} for key {key!r}")

    def array(self, key: str, depth: int = 1):
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays nested more than {MAX_ARRAY_DEPTH} deep in key {key!r}")
        etype = self.u32(f"element type of {key}")
        if etype in _SCALARS:
            size = _SCALARS[etype][1]
            n = self.count(f"array length of {key}", size)
            arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[etype], count=n, offset=self.pos).copy()
            self.pos += n * size
            return arr.astype(bool) if etype == 7 else arr
        if etype == _STRING:
            n = self.count(f"array length of {key}", 8)
            return [self.string(f"element of {key}") for _ in range(n)]
        if etype == _ARRAY:
            n = self.count(f"array length of {key}", 12)
            return [self.array(key, depth + 1) for _ in range(n)]
        raise self.fail(f"unknown array element type {etype} for key {key!r}")


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    dims = [cur.u64(f"dimension of tensor {name!r}") for _ in range(n_dims)]
    type_id = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"offset of tensor {name!r}")
    if type_id not in GGML_TYPES:
        raise cur.fail(f"tensor {name!r} has unsupported type id {type_id} "
                       f"(supported: {', '.join(n for n, _, _ in GGML_TYPES.values())})")
    return name, tuple(reversed(dims)), type_id, offset


def _tensor_nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], type_id: int) -> int:
    tname, block, bsize = GGML_TYPES[type_id]
    n = 1
    for d in shape:
        if d <= 0 or d > cur.size * 8:
            raise cur.fail(f"tensor {name!r} has impossible dimension {d}")
        n *= d
    if shape[-1] % block:
        raise cur.fail(f"tensor {name!r}: row of {shape[-1]} elements is not a multiple of "
                       f"the {tname} block size {block}")
    return n // block * bsize


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and index; tensor bytes stay memory-mapped."""
    path = Path(path)
    try:
        if not path.is_file():
            raise GGUFError(f"{path}: no such file")
        size = path.stat().st_size
    except OSError as e:  # e.g. a parent directory we may not search
        raise GGUFError(f"{path}: cannot stat the file: {e}") from None
    if size < 24:
        raise GGUFError(f"{path}: too small to be a GGUF file ({size} bytes)")
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # unreadable, or shrank to nothing since stat()
        raise GGUFError(f"{path}: cannot open or map the file: {e}") from None
    try:
        return _parse(mm, path)
    except GGUFError:
        mm.close()
        raise


def _parse(mm: mmap.mmap, path: Path) -> GGUFFile:
    cur = _Cursor(mm, path)
    cur.need(4, "magic")
    if mm[:4] != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors = cur.count("tensor count", 8 + 4 + 8 + 4 + 8)
    n_kv = cur.count("metadata count", 8 + 4 + 1)
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        metadata[key] = cur.value(cur.u32(f"value type of {key!r}"), key)
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise cur.fail(f"invalid general.alignment {align!r}")
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, rel in infos:
        if name in tensors:
            raise cur.fail(f"duplicate tensor name {name!r}")
        nbytes = _tensor_nbytes(cur, name, shape, type_id)
        start = data_start + rel
        if rel % align:
            raise cur.fail(f"tensor {name!r} has data offset {rel}, not a multiple of the "
                           f"alignment {align}: corrupt")
        if start + nbytes > cur.size:
            raise cur.fail(f"tensor {name!r} ({nbytes} bytes at offset {start}) lies outside the "
                           f"file ({cur.size} bytes): truncated or corrupt")
        tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)
    return GGUFFile(path, version, metadata, tensors, mm)
