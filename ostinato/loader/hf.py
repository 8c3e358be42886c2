"""A Hugging Face model folder read as the GGUF file llama.cpp's converter would make of it.

`read_hf_folder(path)` returns an `HFFolder` with the interface of a `GGUFFile` (path,
metadata, tensors, raw(name), close()): the metadata holds the GGUF keys convert_hf_to_gguf.py
writes for the architecture (`general.architecture`, `{arch}.block_count`, ...,
`tokenizer.ggml.*`), and the tensors carry GGUF names and the converter's transformations
(Llama's q/k rows reordered for its adjacent-pair rotary, Gemma's norms + 1, experts stacked,
Llama 3's `rope_freqs`). ModelConfig, the decoder and the backends then see no difference.

What is read: config.json (strictly: a key that is not understood and could change the
arithmetic is refused, naming it), generation_config.json (its eos ids end generation too),
safetensors shards (one file or an index; memory-mapped; headers validated by the
`safetensors` package and checked again here), tokenizer.json or tokenizer.model
(hf_tokenizer.py) with tokenizer_config.json and chat_template.jinja. Pickle checkpoints
(*.bin, *.pt) are refused unopened.

Weights keep their type where the engine has one (F32, F16, BF16; norms and 1-D tensors become
F32 as the converter makes them), or are quantized at load (`quantize=`, loader/quantize.py).
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .dequant import dequantize
from .gguf import TYPE_IDS
from .hf_arch import ARCHES, ArchSpec, gguf_params, wrong_values
from .hf_tokenizer import read_json, tokenizer_metadata
from .quantize import QK, QuantizeError, check_type, quantize as quantize_blocks

log = logging.getLogger("ostinato.loader")

_DTYPES = {"F32": ("F32", 4), "F16": ("F16", 2), "BF16": ("BF16", 2)}   # safetensors -> GGML
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_hf_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# the folder as a GGUF file
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFTensor:
    """One GGUF tensor of the folder: its bytes are made on demand by `make`."""
    name: str
    shape: tuple[int, ...]
    type_name: str
    make: Callable[[], np.ndarray] = field(repr=False)
    sources: tuple["Source", ...] = field(default=(), repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.type_name, self.shape)


@dataclass
class HFFolder:
    path: Path
    metadata: dict[str, object]
    tensors: dict[str, HFTensor]
    extra_eos_ids: tuple[int, ...] = ()       # generation_config.json's further eos ids
    quantized: dict[str, str] = field(default_factory=dict)   # GGUF name -> type it got
    _maps: list = field(default_factory=list, repr=False)

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        raw = t.make()
        if raw.size != t.nbytes:
            raise ModelFileError(f"{self.path}: tensor {name!r} made {raw.size} bytes, "
                                 f"expected {t.nbytes}")
        return raw

    def release(self, name: str) -> None:
        """Drop the file pages the tensor was made from (as GGUFFile.release): called once
        the backend has converted it."""
        for src in self.tensors[name].sources:
            src.release()

    def close(self) -> None:
        self._maps.clear()          # the memory maps go when the last view does


def read_hf_folder(path: str | os.PathLike, quantize: str | None = None) -> HFFolder:
    """The folder as GGUF metadata and tensors; quantize: a GGML type name ('q8_0', ...) for
    every weight matrix the converter would quantize."""
    path = Path(path)
    qtype = _check_quantize(quantize)
    config = _read_json(path / "config.json", path)
    spec = _arch_spec(config, path)
    shards, maps = _open_shards(path)
    metadata = {"general.architecture": spec.arch, "general.name": path.name,
                **gguf_params(spec, config, str(path))}
    tok_meta, extra_eos = tokenizer_metadata(path, config)
    metadata.update(tok_meta)
    tensors = _gguf_tensors(spec, config, shards, path)
    folder = HFFolder(path, metadata, tensors, tuple(extra_eos), _maps=maps)
    if qtype is not None:
        _quantize_all(folder, qtype)
    _log_widened(folder)
    return folder


def _log_widened(folder: HFFolder) -> None:
    """F16/BF16 matrices run in float32 (the backend widens them at load, exactly): twice the
    memory and the bytes read per token. Said once, not silently."""
    half = [n for n, t in folder.tensors.items() if len(t.shape) >= 2
            and t.type_name in ("F16", "BF16")]
    if half:
        kind = folder.tensors[half[0]].type_name
        log.warning("%s: %d %s matrices are widened to float32 at load (no half-precision "
                    "kernel): 2x their file size in memory; --quantize q8_0 makes them 1/4",
                    folder.path, len(half), kind)


def _check_quantize(quantize: str | None) -> str | None:
    if quantize is None:
        return None
    try:
        return check_type(quantize)
    except QuantizeError as e:
        raise ModelFileError(str(e)) from None


def _read_json(file: Path, folder: Path, required: bool = True) -> dict | None:
    if not file.is_file():
        if required:
            raise ModelFileError(f"{folder}: {file.name} is missing: not a Hugging Face model "
                                 f"folder")
        return None
    return read_json(file)


def _arch_spec(config: dict, path: Path) -> ArchSpec:
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHES:
        raise ModelFileError(f"{path}/config.json: architectures {archs!r} is not supported "
                             f"(supported: {', '.join(sorted(ARCHES))})")
    return ARCHES[archs[0]]


# ---------------------------------------------------------------------------------------------
# safetensors shards
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One tensor of a shard: safetensors dtype, shape and its bytes (a view of the map)."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    raw: np.ndarray
    mm: mmap.mmap = field(repr=False, compare=False)
    offset: int = 0                 # of raw in the file

    def release(self) -> None:
        """madvise(DONTNEED) over the tensor's pages: advice only; pages read again come back
        from the file."""
        start = self.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, start, self.offset + self.raw.size - start)
        except (OSError, ValueError, AttributeError):
            pass


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        for n in names:
            if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors"):
                raise ModelFileError(f"{index}: shard {n!r} is not a .safetensors file name in "
                                     f"the folder")
            if not (path / n).is_file():
                raise ModelFileError(f"{index}: shard {n!r} is missing from {path}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = sorted(p.name for pat in _PICKLES for p in path.glob(pat))
    if pickles:
        raise ModelFileError(f"{path}: only pickle checkpoints ({', '.join(pickles[:3])}); "
                             f"Ostinato never unpickles (it can run code): convert the folder "
                             f"to safetensors")
    raise ModelFileError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _open_shards(path: Path) -> tuple[dict[str, Source], list]:
    sources: dict[str, Source] = {}
    maps = []
    for file in _shard_files(path):
        mm, tensors = _open_shard(file)
        maps.append(mm)
        for name, src in tensors.items():
            if name in sources:
                raise ModelFileError(f"{file}: tensor {name!r} is also in another shard")
            sources[name] = src
    return sources, maps


def _open_shard(file: Path) -> tuple[mmap.mmap, dict[str, Source]]:
    """Validate the header with the safetensors package (offsets, sizes, overlaps), then map
    the file and hand out each tensor's bytes, checked once more against the file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="numpy") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{file}: not a valid safetensors file: {e}") from None
    size = file.stat().st_size
    with open(file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    n = struct.unpack("<Q", mm[:8])[0]
    header = json.loads(mm[8:8 + n].decode("utf-8"))
    out = {}
    for name in names:
        out[name] = _source(file, name, header[name], 8 + n, size, mm)
    return mm, out


def _source(file: Path, name: str, info: dict, start: int, size: int, mm) -> Source:
    dtype, shape = info.get("dtype"), tuple(info.get("shape", ()))
    lo, hi = info.get("data_offsets", (0, -1))
    if dtype not in _DTYPES:
        raise ModelFileError(f"{file}: tensor {name!r} has dtype {dtype!r} (supported: "
                             f"{', '.join(_DTYPES)}; pre-quantized checkpoints are not)")
    want = math.prod(shape) * _DTYPES[dtype][1]
    if not 0 <= lo <= hi or hi - lo != want or start + hi > size:
        raise ModelFileError(f"{file}: tensor {name!r} has data offsets {[lo, hi]} that do not "
                             f"fit its shape {list(shape)} or the file: corrupt")
    raw = np.frombuffer(mm, dtype=np.uint8, count=hi - lo, offset=start + lo)
    return Source(name, _DTYPES[dtype][0], shape, raw, mm, start + lo)


# ---------------------------------------------------------------------------------------------
# HF tensors -> GGUF tensors
# ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_FUSED_EXPERTS = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)(?:\.weight)?")
_SKIPPED = (".rotary_emb.inv_freq",)


def _gguf_tensors(spec: ArchSpec, config: dict, sources: dict[str, Source],
                  path: Path) -> dict[str, HFTensor]:
    tied = bool(config.get("tie_word_embeddings", spec.tied_default))
    if not (tied or spec.drop_lm_head or "lm_head.weight" in sources):
        raise ModelFileError(f"{path}: config.json says tie_word_embeddings false but "
                             f"lm_head.weight is missing: the output matrix is not in the "
                             f"folder (refusing to tie it to the embeddings silently)")
    out: dict[str, HFTensor] = {}
    experts: dict[tuple[int, str], dict[int, Source]] = {}
    for name, src in sources.items():
        if name.endswith(_SKIPPED) or (name == "lm_head.weight" and (tied or spec.drop_lm_head)):
            continue
        m = _LAYER.fullmatch(name)
        if m and (e := _EXPERT.fullmatch(m[2])):
            experts.setdefault((int(m[1]), e[2]), {})[int(e[1])] = src
            continue
        for gname, shape, make in _map(spec, config, name, src, path):
            shift = spec.norm_shift and name.endswith("norm.weight")
            t = (_shifted if shift else _float_tensor)(gname, shape, make, src.dtype)
            out[gname] = replace(t, sources=(src,))
    for (bid, proj), by_expert in sorted(experts.items()):
        gname, shape, make = _stacked(spec, bid, proj, by_expert, config, path)
        out[gname] = replace(_float_tensor(gname, shape, make, by_expert[0].dtype),
                             sources=tuple(by_expert.values()))
    with wrong_values(str(path)):
        extra = spec.extra_tensors(config)
    for gname, values in extra.items():
        out[gname] = HFTensor(gname, values.shape, "F32", lambda v=values: v.view(np.uint8))
    return out


def _map(spec: ArchSpec, config: dict, name: str, src: Source, path: Path):
    """[(gguf name, shape, make raw bytes)] for one HF tensor."""
    m = _LAYER.fullmatch(name)
    if m is None:
        gname = spec.globals.get(name)
        if gname is None:
            raise _unused(path, name, spec)
        return [(gname, src.shape, lambda: src.raw)]
    bid, rest = int(m[1]), m[2]
    if (f := _FUSED_EXPERTS.fullmatch(rest)) is not None:
        return _split_fused_experts(bid, f[1], src)
    gsuffix = spec.layer.get(rest)
    if gsuffix is None:
        raise _unused(path, name, spec)
    gname = f"blk.{bid}.{gsuffix}"
    heads = spec.permuted_heads(config, rest)
    if heads:
        return [(gname, src.shape, lambda: _pair_rows(src.raw, src.shape, heads))]
    return [(gname, src.shape, lambda: src.raw)]


def _unused(path: Path, name: str, spec: ArchSpec) -> ModelFileError:
    return ModelFileError(f"{path}: tensor {name!r} is not used by Ostinato's "
                          f"{spec.arch} mapping; refusing the folder rather than ignoring "
                          f"what it asks for")


def _pair_rows(raw: np.ndarray, shape: tuple[int, ...], n_head: int) -> np.ndarray:
    """HF's q/k rows rotate halves (row j pairs with j + d/2 in each head); llama.cpp's
    llama rotary pairs adjacent rows: each head's rows become j0, j0+d/2, j1, j1+d/2, ..."""
    rows = raw.reshape(shape[0], -1)
    d = shape[0] // n_head
    order = np.arange(d).reshape(2, d // 2).T.reshape(-1)
    idx = (np.arange(n_head)[:, None] * d + order[None, :]).reshape(-1)
    return np.ascontiguousarray(rows[idx]).reshape(-1)


def _stacked(spec: ArchSpec, bid: int, proj: str, by_expert: dict[int, Source], config: dict,
             path: Path):
    """Per-expert matrices stacked into one (n_expert, rows, cols) GGUF tensor."""
    n = len(by_expert)
    gsuffix = spec.expert_names.get(proj)
    if gsuffix is None or sorted(by_expert) != list(range(n)):
        raise ModelFileError(f"{path}: layer {bid} experts' {proj!r} tensors are not experts "
                             f"0..{n - 1} of a known projection")
    first = by_expert[0]
    if any(s.shape != first.shape or s.dtype != first.dtype for s in by_expert.values()):
        raise ModelFileError(f"{path}: layer {bid} experts' {proj!r} differ in shape or type")
    make = lambda: np.concatenate([by_expert[i].raw for i in range(n)])   # noqa: E731
    return f"blk.{bid}.{gsuffix}", (n, *first.shape), make


def _split_fused_experts(bid: int, kind: str, src: Source):
    """transformers' fused expert tensors: gate_up_proj (n, 2*ff, d) -> gate and up halves."""
    if kind == "down_proj":
        return [(f"blk.{bid}.ffn_down_exps.weight", src.shape, lambda: src.raw)]
    n, two_ff, d = src.shape
    ff = two_ff // 2
    rows = lambda: src.raw.reshape(n, two_ff, -1)                          # noqa: E731
    return [(f"blk.{bid}.ffn_gate_exps.weight", (n, ff, d),
             lambda: np.ascontiguousarray(rows()[:, :ff]).reshape(-1)),
            (f"blk.{bid}.ffn_up_exps.weight", (n, ff, d),
             lambda: np.ascontiguousarray(rows()[:, ff:]).reshape(-1))]


def _float_tensor(gname: str, shape: tuple[int, ...], make, dtype: str) -> HFTensor:
    """Norms and 1-D tensors in F32 (as the converter writes them), the rest as stored; Gemma's
    norm shift is applied by the spec's `transform` before."""
    if len(shape) <= 1 or gname.endswith("_norm.weight"):
        if dtype == "F32":
            return HFTensor(gname, shape, "F32", make)
        return HFTensor(gname, shape, "F32", lambda: dequantize(
            make(), TYPE_IDS[dtype], shape).view(np.uint8).reshape(-1))
    return HFTensor(gname, shape, dtype, make)


def _shifted(gname: str, shape: tuple[int, ...], make, dtype: str) -> HFTensor:
    """Gemma's RMSNorm scales by (1 + w): the GGUF stores 1 + w in F32, added in float32."""
    def shifted() -> np.ndarray:
        return (dequantize(make(), TYPE_IDS[dtype], shape) + np.float32(1.0)).view(np.uint8)
    return HFTensor(gname, shape, "F32", lambda: shifted().reshape(-1))


def _quantize_all(folder: HFFolder, qtype: str) -> None:
    """Every tensor the converter quantizes: `.weight` of 2+ dims, not a norm, not the MoE
    router; a row that is not a whole number of blocks falls back to F16, as the converter
    does (logged)."""
    for name, t in list(folder.tensors.items()):
        if len(t.shape) < 2 or not name.endswith(".weight") or name.endswith(
                ("_norm.weight", "ffn_gate_inp.weight")):
            continue
        if t.shape[-1] % QK:
            log.warning("%s: %s rows of %d values are not whole %s blocks: F16 instead",
                        folder.path, name, t.shape[-1], qtype)
            kind = "F16"
        else:
            kind = qtype
        folder.tensors[name] = replace(t, type_name=kind, make=_quantizer(t, kind))
        folder.quantized[name] = kind
    log.info("%s: %d matrices are quantized to %s while loading (numpy, ~10-40 M values/s)",
             folder.path, len(folder.quantized), qtype)


def _quantizer(t: HFTensor, kind: str):
    def make() -> np.ndarray:
        values = dequantize(t.make(), TYPE_IDS[t.type_name], t.shape)
        if kind == "F16":
            return values.astype("<f2").view(np.uint8).reshape(-1)
        return quantize_blocks(values.reshape(-1, t.shape[-1]), kind).reshape(-1)
    return make


def _nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    from .gguf import GGML_TYPES
    _, block, size = GGML_TYPES[TYPE_IDS[type_name]]
    return math.prod(shape) // block * size
