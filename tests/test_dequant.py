"""Dequantization must match the `gguf` package's reference dequantizer bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the reference package gguf (test extra) is needed")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants as ref  # noqa: E402

from ostinato.loader.dequant import dequantize, load_tensor  # noqa: E402
from ostinato.loader.gguf import GGML_TYPES, TYPE_IDS, GGUFError, read_gguf  # noqa: E402

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
MAX_ROWS = 3000  # rows of a big tensor to compare; keeps the whole file to a few seconds

# Byte offsets of the fp16 scale/min fields in each block; random bytes there could be NaN/inf.
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _model_file(request, fixture: str, filename: str) -> Path:
    """The model file from conftest's fixture (which skips, or fails in CI, when missing)."""
    path = Path(request.getfixturevalue(fixture))
    assert path.name == filename
    return path


def _reference(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """gguf.quants.dequantize on the same bytes, reshaped to `shape`."""
    _, block, bsize = GGML_TYPES[type_id]
    rows = raw.reshape(-1, shape[-1] // block * bsize)
    return np.asarray(ref.dequantize(rows, QT(type_id)), dtype=np.float32).reshape(shape)


def _assert_bitwise(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    diff = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
    assert diff.size == 0, (f"{diff.size} of {ours.size} values differ; first at flat index "
                            f"{diff[0]}: {ours.flat[diff[0]]!r} vs {theirs.flat[diff[0]]!r}")


# ---- real files ------------------------------------------------------------------------

REAL_CASES = [(SMOLLM, "smollm_path", t) for t in ("Q4_1", "Q8_0", "F32")] + \
             [(GEMMA, "gemma_path", t) for t in ("Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32")]


@pytest.mark.parametrize("filename,fixture,type_name", REAL_CASES,
                         ids=[f"{f.split('-')[0]}-{t}" for f, _, t in REAL_CASES])
def test_real_tensors_match_reference(request, filename, fixture, type_name):
    gf = read_gguf(_model_file(request, fixture, filename))
    try:
        picked = [t for t in gf.tensors.values() if t.type_name == type_name]
        assert picked, f"{filename} should contain a {type_name} tensor"
        # the first tensor of the type and the biggest one (often the embedding)
        for info in {picked[0].name: picked[0], max(picked, key=lambda t: t.nbytes).name:
                     max(picked, key=lambda t: t.nbytes)}.values():
            rows = min(info.shape[0], MAX_ROWS)
            shape = (rows,) + info.shape[1:]
            raw = gf.raw(info.name)[: info.nbytes // info.shape[0] * rows]
            _assert_bitwise(dequantize(raw, info.type_id, shape),
                            _reference(raw, info.type_id, shape))
    finally:
        gf.close()


def test_load_tensor_real_file(request):
    gf = read_gguf(_model_file(request, "smollm_path", SMOLLM))
    try:
        info = gf.tensors["blk.0.ffn_down.weight"]
        w = load_tensor(gf, info.name)
        assert w.shape == info.shape == (576, 1536)
        _assert_bitwise(w, _reference(gf.raw(info.name), info.type_id, info.shape))
        assert np.isfinite(w).all() and w.std() > 0
        with pytest.raises(GGUFError, match="no tensor named 'nope'"):
            load_tensor(gf, "nope")
    finally:
        gf.close()


# ---- synthetic blocks for every type ----------------------------------------------------

def _finite_fp16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random fp16 bit patterns covering every finite class: ±0, subnormal, normal, ±65504."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    inf_or_nan = (bits & 0x7C00) == 0x7C00
    bits[inf_or_nan] &= np.uint16(0xFBFF)  # clear one exponent bit: finite
    bits[:4] = [0x0000, 0x8000, 0x0001, 0x7BFF]  # +0, -0, smallest subnormal, max
    return bits


def _random_blocks(type_name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for n_blocks blocks, with every fp16 scale field finite."""
    rng = np.random.default_rng(seed)
    _, _, bsize = GGML_TYPES[TYPE_IDS[type_name]]
    blocks = rng.integers(0, 256, size=(n_blocks, bsize), dtype=np.uint8)
    for off in FP16_FIELDS.get(type_name, []):
        blocks[:, off:off + 2] = _finite_fp16_bits(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


ALL_TYPES = [name for name, _, _ in GGML_TYPES.values()]


def test_all_eleven_types_covered():
    assert sorted(ALL_TYPES) == sorted(["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                        "Q8_0", "Q4_K", "Q5_K", "Q6_K"])


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_random_blocks_match_reference(type_name):
    type_id = TYPE_IDS[type_name]
    _, block, _ = GGML_TYPES[type_id]
    shape = (37, 3, 4 * 256)  # odd outer dims, rows of whole blocks for every type
    n_blocks = int(np.prod(shape)) // block
    raw = _random_blocks(type_name, n_blocks, seed=type_id)
    ours = dequantize(raw, type_id, shape)
    if type_name in FP16_FIELDS:  # quantized: finite scales give finite values
        assert np.isfinite(ours).all()
    _assert_bitwise(ours, _reference(raw, type_id, shape))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"])
def test_reference_quantized_data_roundtrip(type_name):
    # Realistic blocks from the reference quantizer, including all-zero and constant rows.
    type_id = TYPE_IDS[type_name]
    x = np.random.default_rng(7).standard_normal((64, 512)).astype(np.float32)
    x[0] = 0.0
    x[1] = -3.25
    raw = np.ascontiguousarray(ref.quantize(x, QT(type_id))).view(np.uint8).reshape(-1)
    ours = dequantize(raw, type_id, x.shape)
    _assert_bitwise(ours, _reference(raw, type_id, x.shape))
    assert np.abs(ours - x).max() < 0.5  # and it is close to what was quantized


def test_chunking_does_not_change_results(monkeypatch):
    # Many small chunks, with a ragged last one, must give the same bits as one big chunk.
    import ostinato.loader.dequant as dq
    for type_name in ("Q6_K", "Q5_1"):
        type_id = TYPE_IDS[type_name]
        raw = _random_blocks(type_name, 7 * 256 // GGML_TYPES[type_id][1] * 3, seed=1)
        whole = dequantize(raw, type_id, (21, 256))
        monkeypatch.setattr(dq, "_CHUNK_ELEMS", 768)
        _assert_bitwise(dequantize(raw, type_id, (21, 256)), whole)
        monkeypatch.undo()


# ---- hand-computed values (independent of the reference package) ------------------------

def test_q8_0_by_hand():
    d = np.float16(0.5).view(np.uint16).tobytes()
    q = np.arange(-16, 16, dtype=np.int8).tobytes()
    out = dequantize(np.frombuffer(d + q, np.uint8), TYPE_IDS["Q8_0"], (32,))
    np.testing.assert_array_equal(out, np.arange(-16, 16, dtype=np.float32) * 0.5)


def test_q4_1_by_hand():
    # d = 2, m = -1; byte j holds element j (low nibble) and element 16 + j (high nibble).
    d, m = np.float16(2).tobytes(), np.float16(-1).tobytes()
    lo, hi = np.arange(16, dtype=np.uint8), np.full(16, 15, dtype=np.uint8) - np.arange(16, dtype=np.uint8)
    packed = (lo | (hi << 4)).astype(np.uint8).tobytes()
    out = dequantize(np.frombuffer(d + m + packed, np.uint8), TYPE_IDS["Q4_1"], (32,))
    expect = np.concatenate([lo, hi]).astype(np.float32) * 2 - 1
    np.testing.assert_array_equal(out, expect)


# ---- errors ---------------------------------------------------------------------------

def test_unknown_type_id_is_a_clear_value_error():
    with pytest.raises(ValueError, match="type id 99"):
        dequantize(np.zeros(64, np.uint8), 99, (16,))


def test_wrong_byte_count_or_ragged_row():
    q8 = TYPE_IDS["Q8_0"]
    with pytest.raises(ValueError, match="needs 68 uint8 bytes, got 67"):
        dequantize(np.zeros(67, np.uint8), q8, (2, 32))
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        dequantize(np.zeros(34, np.uint8), q8, (1, 30))
