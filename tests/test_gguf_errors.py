"""Bad GGUF input must fail fast with one GGUFError line naming the file and the problem.

Synthetic files are written by hand with `struct` (layout of GGUF v3: magic, version,
tensor count, metadata count, key/value pairs, tensor infos, padding to the alignment,
tensor data). Real-file cases use only a prefix of the SmolLM2 file, never a full copy.
"""
from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ostinato.loader.dequant import load_tensor
from ostinato.loader.gguf import TYPE_IDS, GGUFError, read_gguf

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
# a bound against hangs and quadratic parsing, not a speed figure: a real header (49k tokens)
# parses in ~1 s on a quiet core, and in over 2 s on a machine shared with other jobs
TIME_LIMIT_S = 10.0
F32, Q8_0 = TYPE_IDS["F32"], TYPE_IDS["Q8_0"]
# metadata value types
U32, I32, F32_V, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


# ---- a tiny GGUF writer ----------------------------------------------------------------

def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def tensor_info(name: str, dims: list[int], type_id: int, offset: int) -> bytes:
    """dims in GGUF order (innermost first), offset relative to the data section."""
    return (gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


def build(kvs=(), tensors=(), data=b"", *, version=3, n_tensors=None, n_kv=None,
          align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version,
                                 len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % align) + data


def valid_parts():
    """kvs, tensors, data of a small well-formed file: a 2x8 F32 and a 1x32 Q8_0 tensor."""
    a = np.arange(16, dtype=np.float32)
    q8 = np.float16(0.25).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()
    kvs = [kv("general.name", STRING, gstr("tiny")),
           kv_u32("tiny.count", 7),
           kv("tiny.list", ARRAY, struct.pack("<IQ", I32, 3) + struct.pack("<3i", -1, 0, 1)),
           kv("tiny.words", ARRAY, struct.pack("<IQ", STRING, 2) + gstr("a") + gstr("\u00e9")),
           kv("tiny.flag", BOOL, b"\x01")]
    tensors = [tensor_info("a", [8, 2], F32, 0), tensor_info("q", [32, 1], Q8_0, 64)]
    data = a.tobytes() + b"\0" * (64 - a.nbytes) + q8
    return kvs, tensors, data


# ---- helpers ---------------------------------------------------------------------------

def _model_file(request, fixture: str, filename: str) -> Path:
    """The model file from conftest's fixture (which skips, or fails in CI, when missing)."""
    path = Path(request.getfixturevalue(fixture))
    assert path.name == filename
    return path


def _check_message(err: GGUFError, path: Path, fragment: str) -> None:
    msg = str(err)
    assert msg.count("\n") == 0 and "\r" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg, f"message does not name the file: {msg!r}"
    assert fragment.lower() in msg.lower(), f"expected {fragment!r} in {msg!r}"


def expect_error(path: Path, fragment: str, *, memory_budget: int | None = None) -> GGUFError:
    """read_gguf(path) must raise GGUFError mentioning `fragment`, quickly and in bounded
    memory: peak traced allocation at most `memory_budget` (default: 2x file + 1 MiB)."""
    size = path.stat().st_size if path.exists() else 0
    budget = memory_budget if memory_budget is not None else 2 * size + (1 << 20)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as info:  # anything else propagates and fails the test
            read_gguf(path)
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        if started:
            tracemalloc.stop()
    _check_message(info.value, path, fragment)
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f} s"
    assert peak <= budget, f"peak allocation {peak} bytes for a {size}-byte file"
    return info.value


def write(tmp_path: Path, content: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ---- the writer itself produces a file both readers accept ----------------------------

def test_valid_synthetic_file_reads(tmp_path):
    kvs, tensors, data = valid_parts()
    path = write(tmp_path, build(kvs, tensors, data), "ok.gguf")
    gf = read_gguf(path)
    try:
        assert gf.version == 3
        assert gf.metadata["general.name"] == "tiny" and gf.metadata["tiny.count"] == 7
        assert list(gf.metadata["tiny.list"]) == [-1, 0, 1]
        assert gf.metadata["tiny.words"] == ["a", "\u00e9"] and gf.metadata["tiny.flag"] is True
        np.testing.assert_array_equal(load_tensor(gf, "a"), np.arange(16).reshape(2, 8))
        np.testing.assert_array_equal(load_tensor(gf, "q"), [np.arange(-16, 16) * 0.25])
    finally:
        gf.close()
    gguf = pytest.importorskip("gguf")  # the reference reader agrees on the layout
    ref = gguf.GGUFReader(path)
    assert [t.name for t in ref.tensors] == ["a", "q"]
    np.testing.assert_array_equal(ref.tensors[0].data.reshape(-1), np.arange(16))


# ---- synthetic bad files ---------------------------------------------------------------

def _bad_files():
    """(id, file bytes, expected message fragment) for each kind of damage."""
    kvs, tensors, data = valid_parts()
    a_f32 = tensor_info("a", [8, 2], F32, 0)
    deep = b"".join(struct.pack("<IQ", ARRAY, 1) for _ in range(20000)) + struct.pack("<IQ", U32, 0)
    cases = [
        ("wrong-magic", b"GGML" + build(kvs, tensors, data)[4:], "not a GGUF file"),
        ("version-1", build(kvs, tensors, data, version=1), "unsupported GGUF version 1"),
        ("version-4", build(kvs, tensors, data, version=4), "unsupported GGUF version 4"),
        ("version-huge", build(kvs, tensors, data, version=0xFFFFFFFF), "unsupported GGUF version"),
        ("tensor-count-2**60", build(kvs, tensors, data, n_tensors=2**60), "tensor count"),
        ("tensor-count-max", build(kvs, tensors, data, n_tensors=2**64 - 1), "tensor count"),
        ("kv-count-2**60", build(kvs, tensors, data, n_kv=2**60), "metadata count"),
        ("kv-count-one-too-many", build(kvs, tensors, data, n_kv=len(kvs) + 1), "corrupt"),
        ("key-length-2**63", build([struct.pack("<Q", 2**63) + b"k" * 40]), "metadata key"),
        ("string-value-length-2**62",
         build([kv("general.name", STRING, struct.pack("<Q", 2**62) + b"x" * 40)]), "general.name"),
        ("u32-array-length-2**62",
         build([kv("big", ARRAY, struct.pack("<IQ", U32, 2**62) + b"\0" * 64)]), "array length of big"),
        ("string-array-length-2**62",
         build([kv("words", ARRAY, struct.pack("<IQ", STRING, 2**62) + gstr("a"))]),
         "array length of words"),
        ("nested-array-length-2**62",
         build([kv("nest", ARRAY, struct.pack("<IQ", ARRAY, 2**62) + b"\0" * 64)]),
         "array length of nest"),
        ("arrays-nested-20000-deep", build([kv("deep", ARRAY, deep)]), "nested"),
        ("unknown-value-type", build([kv("odd", 13, b"\0" * 16)]), "unknown metadata value type 13"),
        ("unknown-array-type", build([kv("odd", ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8)]),
         "unknown array element type 77"),
        ("truncated-scalar", build([kv("x", U32, b"\0")], align=1), "value of x"),
        ("tensor-name-length-2**62",
         build(kvs, [struct.pack("<Q", 2**62) + b"t" * 64], data), "tensor name"),
        ("unsupported-type-q2_k", build(kvs, [tensor_info("a", [256], 10, 0)], b"\0" * 256),
         "unsupported type id 10"),
        ("unsupported-type-2**31", build(kvs, [tensor_info("a", [8], 2**31, 0)], b"\0" * 64),
         "unsupported type id"),
        ("offset-past-eof", build(kvs, [tensor_info("a", [8, 2], F32, 1 << 40)], data),
         "outside the file"),
        ("size-past-eof", build(kvs, [tensor_info("a", [8, 2], F32, 0)], data[:40]),
         "outside the file"),
        ("offset-misaligned", build(kvs, [tensor_info("a", [8, 2], F32, 4)], data),
         "not a multiple of the alignment"),
        ("huge-dims", build(kvs, [tensor_info("a", [2**40, 2**40], F32, 0)], data),
         "impossible dimension"),
        ("zero-dim", build(kvs, [tensor_info("a", [8, 0], F32, 0)], data), "impossible dimension"),
        ("ragged-q8-row", build(kvs, [tensor_info("q", [30], Q8_0, 0)], data), "block size"),
        ("duplicate-tensor", build(kvs, [a_f32, a_f32], data), "duplicate tensor name 'a'"),
        ("five-dims", build(kvs, [tensor_info("a", [2, 2, 2, 2, 1], F32, 0)], data),
         "5 dimensions"),
        ("zero-dims", build(kvs, [tensor_info("a", [], F32, 0)], data), "0 dimensions"),
        ("dim-count-2**31", build(kvs, [gstr("a") + struct.pack("<I", 2**31) + b"\0" * 64], data),
         "dimensions"),
        ("alignment-0", build(kvs + [kv_u32("general.alignment", 0)], tensors, data),
         "general.alignment"),
        ("alignment-3", build(kvs + [kv_u32("general.alignment", 3)], tensors, data),
         "general.alignment"),
        ("alignment-string", build(kvs + [kv("general.alignment", STRING, gstr("32"))],
                                   tensors, data), "general.alignment"),
        ("newline-in-key", build([kv("evil\nkey", STRING, struct.pack("<Q", 2**40))]), "evil"),
        ("huge-key-in-message", build([kv("k" * 100_000, U32, b"")], align=1), "corrupt"),
    ]
    return cases


BAD = _bad_files()


@pytest.mark.parametrize("content,fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_synthetic_file(tmp_path, content, fragment):
    err = expect_error(write(tmp_path, content), fragment)
    assert len(str(err)) < 2000  # a forged 100 kB key is elided, not echoed


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_directory_is_not_a_file(tmp_path):
    expect_error(tmp_path, "no such file")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\0\0\0" + b"\0" * 15],
                         ids=["empty", "magic-only", "23-bytes"])
def test_too_small(tmp_path, content):
    expect_error(write(tmp_path, content), "too small")


def test_every_truncation_of_a_small_file(tmp_path):
    # Cut a valid file at every byte short of its end: each cut fails cleanly.
    kvs, tensors, data = valid_parts()
    full = build(kvs, tensors, data)
    for n in range(len(full)):
        path = write(tmp_path, full[:n], f"cut{n}.gguf")
        with pytest.raises(GGUFError) as info:
            read_gguf(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_random_corruption_of_a_small_file(tmp_path):
    # Every byte of a small file is structure, so flips here reach every parser branch.
    kvs, tensors, data = valid_parts()
    full = build(kvs, tensors, data)
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    for _ in range(600):
        b = bytearray(full)
        for pos in rng.integers(0, len(full) - len(data), size=rng.integers(1, 4)):
            b[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(b))
        try:
            read_gguf(path).close()  # some flips (e.g. inside a string) leave a valid file
        except GGUFError as e:
            assert "\n" not in str(e) and str(path) in str(e)


# ---- the real SmolLM2 header -----------------------------------------------------------

HEADER_CUT_FRACTIONS = [0.0001, 0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999]


@pytest.fixture(scope="module")
def smollm_header(request) -> tuple[Path, bytes, int]:
    """(path, first bytes of the file up to a little past the data start, data start)."""
    path = _model_file(request, "smollm_path", SMOLLM)
    gf = read_gguf(path)
    data_start = min(t.offset for t in gf.tensors.values())
    gf.close()
    assert data_start < (4 << 20), "the header should fit in the first 4 MB"
    with open(path, "rb") as f:
        prefix = f.read(data_start + 4096)
    return path, prefix, data_start


@pytest.mark.parametrize("frac", HEADER_CUT_FRACTIONS)
def test_truncated_real_header(tmp_path, smollm_header, frac):
    _, prefix, data_start = smollm_header
    cut = max(24, int(data_start * frac))
    path = write(tmp_path, prefix[:cut])
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    assert time.perf_counter() - t0 < TIME_LIMIT_S
    _check_message(info.value, path, "corrupt")


@pytest.mark.parametrize("cut_back", [5000, 1], ids=["in-tensor-infos", "before-data"])
def test_truncated_real_header_near_data(tmp_path, smollm_header, cut_back):
    _, prefix, data_start = smollm_header
    path = write(tmp_path, prefix[:data_start - cut_back])
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    _check_message(info.value, path, "corrupt")


def test_real_header_with_data_cut_off(tmp_path, smollm_header):
    # The whole header parses; the first tensor's bytes are missing. Python objects for the
    # 49152 tokens and 48900 merges legitimately cost a few times the header's size.
    _, prefix, _ = smollm_header
    path = write(tmp_path, prefix)
    expect_error(path, "outside the file", memory_budget=8 * len(prefix) + (1 << 20))


def _forge(prefix: bytes, offset: int, value: int) -> bytes:
    return prefix[:offset] + struct.pack("<Q", value) + prefix[offset + 8:]


def _key_value_offset(prefix: bytes, key: str) -> int:
    """Offset of the value of metadata `key` (just past its u32 type) in the real header."""
    at = prefix.index(gstr(key))
    return at + len(gstr(key)) + 4


@pytest.mark.parametrize("forge,fragment", [
    (lambda p: _forge(p, 8, 2**60), "tensor count"),
    (lambda p: _forge(p, 16, 2**60), "metadata count"),
    # tokenizer.ggml.tokens: u32 element type, then u64 length
    (lambda p: _forge(p, _key_value_offset(p, "tokenizer.ggml.tokens") + 4, 2**62),
     "array length of tokenizer.ggml.tokens"),
    (lambda p: _forge(p, _key_value_offset(p, "tokenizer.ggml.token_type") + 4, 2**62),
     "array length of tokenizer.ggml.token_type"),
    (lambda p: _forge(p, _key_value_offset(p, "general.architecture"), 2**62),
     "general.architecture"),
], ids=["tensor-count", "kv-count", "tokens-length", "token-type-length", "string-length"])
def test_forged_real_header(tmp_path, smollm_header, forge, fragment):
    _, prefix, _ = smollm_header
    forged = forge(prefix)
    assert len(forged) == len(prefix) and forged != prefix
    # Forged counts must be refused before the parser allocates for them.
    expect_error(write(tmp_path, forged), fragment, memory_budget=8 * len(prefix) + (1 << 20))


def test_byte_flip_fuzz_real_header(tmp_path, smollm_header):
    # Flip 1-3 random bytes in the first 64 KiB (key/value headers and the start of the
    # token list). Only GGUFError may escape, one line, quickly.
    _, prefix, _ = smollm_header
    rng = np.random.default_rng(20240611)
    path = tmp_path / "flipped.gguf"
    for i in range(200):
        b = bytearray(prefix)
        for pos in rng.integers(0, 64 * 1024, size=rng.integers(1, 4)):
            b[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(b))
        t0 = time.perf_counter()
        try:
            read_gguf(path).close()  # the data is cut off, but a flip could drop all tensors
        except GGUFError as e:
            assert "\n" not in str(e) and str(path) in str(e), f"iteration {i}: {e!r}"
        elapsed = time.perf_counter() - t0
        assert elapsed < TIME_LIMIT_S, f"iteration {i} took {elapsed:.2f} s"
