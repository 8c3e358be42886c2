"""The C++ kernels: repacking is exact, matmul/norm/attention agree with a float64
reference, and every row's result is bit-identical whatever else is in the batch."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ostinato.kernels.backend import CpuKernels, QWeight
from ostinato.kernels.repack import repack_raw
from ostinato.loader.dequant import dequantize
from ostinato.loader.gguf import GGML_TYPES, TYPE_IDS

FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
ALL_TYPES = [name for name, _, _ in GGML_TYPES.values()]


@pytest.fixture(scope="module")
def k():
    return CpuKernels()


@pytest.fixture(scope="module")
def k_f32():
    return CpuKernels(quantize_activations=False)


@pytest.fixture(scope="module", params=["int16", "f32"])
def k_any(request):
    return CpuKernels(quantize_activations=request.param == "int16")


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply with, emulated in numpy float32: per 32 elements
    d = max|x| / 32767, q = round-half-even(x / d); returns d * q (float64)."""
    b = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    d = amax / np.float32(32767)
    normal = d >= np.finfo(np.float32).tiny       # smaller blocks count as zero
    with np.errstate(divide="ignore"):
        inv = np.where(normal, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv)
    d = np.where(normal, d, np.float32(0))
    assert np.abs(q).max() <= 32767
    return torch.from_numpy((q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape))


def random_tensor(type_name: str, N: int, K: int, seed: int) -> np.ndarray:
    """Random GGUF bytes for an (N, K) tensor; fp16 scales small and finite."""
    rng = np.random.default_rng(seed)
    _, block, bsize = GGML_TYPES[TYPE_IDS[type_name]]
    if block == 1:   # plain floats
        vals = rng.standard_normal((N, K)).astype(np.float32)
        if type_name == "F32":
            return vals.view(np.uint8).reshape(-1)
        if type_name == "F16":
            return vals.astype(np.float16).view(np.uint8).reshape(-1)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1)
    blocks = rng.integers(0, 256, size=(N * K // block, bsize), dtype=np.uint8)
    for off in FP16_FIELDS[type_name]:
        scales = (rng.random(len(blocks)) * 0.02).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def packed(type_name: str, N: int = 96, K: int = 512, seed: int = 0):
    raw = random_tensor(type_name, N, K, seed)
    return raw, repack_raw(raw, type_name, N, K)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_repack_is_exact(type_name):
    raw, p = packed(type_name)
    ref = dequantize(raw, TYPE_IDS[type_name], (96, 512))
    assert np.array_equal(p.dequantize().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_qlinear_matches_float64_reference(k_f32, type_name):
    raw, p = packed(type_name)
    w = QWeight.from_packed(p)
    x = torch.randn(13, 512)
    ref = x.double() @ torch.from_numpy(p.dequantize()).double().T
    got = k_f32.linear(x, w).double()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    rows = torch.tensor([0, 5, 95])
    assert torch.equal(w.rows(rows), torch.from_numpy(p.dequantize())[rows])


@pytest.mark.parametrize("N", [96, 37])          # 37: the kernels' ragged tail of weight rows
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_quantized_activations_match_their_float64_reference(k, type_name, N):
    """The default path is exact integer arithmetic on the quantized activations: it equals a
    float64 product of those activations with the weights (min terms use the exact x)."""
    raw, p = packed(type_name, N=N)
    w = QWeight.from_packed(p)
    x = torch.randn(13, 512)
    x[3, 32:64] = 0.0                                          # an all-zero block
    dense = torch.from_numpy(p.dequantize()).double()
    if p.fmt == 0:        # float weights keep float activations
        ref = x.double() @ dense.T
    else:
        mins = torch.from_numpy(p.values(p.min, p.min_d)).double() if p.min is not None else None
        codes = dense if mins is None else dense - mins.repeat_interleave(p.bs, dim=1)
        ref = quantize_activations(x) @ codes.T
        if mins is not None:
            xsum = x.double().reshape(13, -1, p.bs).sum(-1)
            ref += xsum @ mins.T
    got = k.linear(x, w).double()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    exact = x.double() @ dense.T                               # and near the unquantized product
    assert (got - exact).abs().max() <= 1e-4 * exact.abs().max()


def test_quantized_activations_edge_cases(k):
    """A NaN reaches the output (never silently dropped); a block of values too small for a
    normal scale counts as zero instead of turning into garbage."""
    _, p = packed("Q4_0")
    w = QWeight.from_packed(p)
    x = torch.randn(3, 512)
    x[1, 40] = float("nan")
    x[2, :32] = 1e-37
    out = k.linear(x, w)
    assert out[1].isnan().all() and not out[0].isnan().any()
    x2 = x[2:3].clone()
    x2[0, :32] = 0.0
    assert torch.equal(out[2:3], k.linear(x2, w))


def test_qkv_rope_cache_rejects_a_slot_outside_the_cache(k):
    from ostinato.model.config import Rope
    from ostinato.model.layers import rope_inv_freq, rope_tables
    cos, sin = rope_tables(torch.tensor([0, 1]), rope_inv_freq(Rope(10000.0, 64)))
    kc, vc = k.new_kv_cache(2, 16, 1, 64)
    qkv = torch.randn(2, 3 * 64)
    with pytest.raises(RuntimeError, match="slot out of range"):
        k.qkv_rope_cache(qkv, None, None, 1e-6, cos, sin, True, 1, kc, vc, torch.tensor([0, 32]))
    with pytest.raises(RuntimeError, match="KV caches must be"):      # the wrong layout
        k.qkv_rope_cache(qkv, None, None, 1e-6, cos, sin, True, 1, torch.zeros(2, 16, 1, 64),
                         torch.zeros(2, 16, 1, 64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiples of 16"):
        k.new_kv_cache(2, 8, 1, 64)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F32"])
def test_qlinear_rows_are_batch_invariant(k_any, type_name):
    k = k_any
    _, p = packed(type_name)
    w = QWeight.from_packed(p)
    x = torch.randn(70, 512)
    full = k.linear(x, w)
    for m in (1, 2, 3, 4, 5, 9, 64):                      # every row-tile shape
        for start in (0, 3, 70 - m):
            assert torch.equal(k.linear(x[start:start + m], w), full[start:start + m])
    shuffled = torch.randperm(70)
    assert torch.equal(k.linear(x[shuffled], w), full[shuffled])
    torch.set_num_threads(1)
    try:
        assert torch.equal(k.linear(x, w), full)             # thread count does not matter
    finally:
        torch.set_num_threads(2)


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(ln for ln in f if ln.startswith("flags")).split(":")[1].split())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_amx_tiles_give_the_avx_kernels_bits(k, type_name):
    """Where the CPU has AMX, batches from 5 rows run on the tile unit; every row must still
    equal, bit for bit, what the AVX kernels give (which run it alone at batch 1)."""
    ops = k.ops
    if "amx_int8" not in _cpu_flags() or os.environ.get("OSTINATO_MARCH", "native") != "native":
        assert not ops.amx_available()        # nothing claims tiles the CPU (or build) lacks
        return
    assert ops.amx_available()
    for N in (96, 37):                        # 37: a ragged last group of weight rows
        _, p = packed(type_name, N=N, seed=N)
        w = QWeight.from_packed(p)
        x = torch.randn(37, 512)              # 37: a ragged last tile of x rows
        x[3, 32:64] = 0.0
        x[5, :32] = 1e-37
        settings = ops.amx_settings()
        try:
            ops.set_amx(False, 6)
            avx = k.linear(x, w)
            ops.set_amx(True, 1)
            amx = k.linear(x, w)
        finally:
            ops.set_amx(*settings)
        assert torch.equal(amx, avx)
        assert torch.equal(k.linear(x[:1], w), amx[:1])      # batch 1 (AVX) == batch 37 (AMX)


@pytest.mark.parametrize("type_name,N", [("Q4_0", 16384), ("Q8_0", 16392), ("Q4_K", 16384)])
def test_a_staged_output_has_the_same_bits(k, type_name, N):
    """Past 32 rows and 8 MiB of output (an LM head's logits) the tile kernel stages columns
    in a buffer of each thread's and copies whole row pieces out: every row equals the same
    row in a batch whose output is stored directly, and the AVX kernels' row at batch 1
    (N = 16,392: a ragged last group of columns). On a CPU without AMX nothing is staged and
    the same assertions check the AVX kernels' rows alone."""
    _, p = packed(type_name, N=N, K=256, seed=7)
    w = QWeight.from_packed(p)
    x = torch.randn(140, 256)                 # 140 x 16,384 floats: 9.2 MB of output
    full = k.linear(x, w)
    for start in (0, 40, 100):                # 40 rows: 2.6 MB, stored directly
        assert torch.equal(k.linear(x[start:start + 40], w), full[start:start + 40])
    assert torch.equal(k.linear(x[7:8], w), full[7:8])
    assert torch.isfinite(full).all() and full.abs().sum() > 0


def expected_panel_isa(march: str, flags: set[str]) -> tuple[str] | None:
    """The weight panels' instruction set a build must pick (test_portability runs this file
    under OSTINATO_MARCH=haswell and skylake-avx512), or None for a march not listed."""
    if march == "native":
        if {"avx512bw", "avx512_vnni"} <= flags:
            return ("avx512_vnni",)
        if "avx512bw" in flags:                     # Skylake-SP: madd + add
            return ("avx512bw",)
        return ("avx_vnni",) if "avx_vnni" in flags else ("avx2",)
    return {"haswell": ("avx2",), "skylake-avx512": ("avx512bw",)}.get(march)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_weight_panels_give_the_avx_kernels_bits(k, type_name):
    """Without AMX, batches from 2 rows (5 in AVX2) run on weight panels (panels.h: AVX-512,
    with VNNI or without, whose Q4 and int8 panels are unpacked by word columns, or AVX2 in an
    OSTINATO_MARCH=haswell build, which test_portability runs); every row must still equal,
    bit for bit, what the AVX tiles give, at every ragged shape (whole and partial panels)."""
    ops = k.ops
    want = expected_panel_isa(os.environ.get("OSTINATO_MARCH", "native"), _cpu_flags())
    assert ops.panel_isa() in (want or ("avx2", "avx_vnni", "avx512bw", "avx512_vnni"))
    settings, amx = ops.panel_settings(), ops.amx_settings()
    # ragged weight groups and x tails (520: a prefill chunk's many rows)
    for N, M in ((96, 37), (37, 13), (16, 5), (50, 64), (40, 520)):
        _, p = packed(type_name, N=N, seed=N)
        w = QWeight.from_packed(p)
        x = torch.randn(M, 512)
        x[3, 32:64] = 0.0                     # a zero block
        x[1, :32] = 1e-37                     # a block too small for a normal scale
        x[2, 64:96] *= 1e4                    # a block with a large scale
        try:
            ops.set_amx(False, 5)
            ops.set_panels(False, 5)
            avx = k.linear(x, w)
            ops.set_panels(True, 1)
            panels = k.linear(x, w)
            for m in range(M):                # every batch size from M down to 1
                assert torch.equal(k.linear(x[m:], w)[0], avx[m]), (N, M, m)
        finally:
            ops.set_panels(*settings)
            ops.set_amx(*amx)
        assert torch.equal(panels, avx), (N, M)


def test_rms_norm_and_gated_act(k):
    x, w = torch.randn(37, 640), torch.randn(640)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    got = k.rms_norm(x, w, 1e-6)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(k.rms_norm(x[7:8], w, 1e-6), got[7:8])
    g, u = torch.randn(9, 256), torch.randn(9, 256)
    assert torch.allclose(gated(k, g, u, "silu"), F.silu(g) * u, atol=1e-6)
    assert torch.allclose(gated(k, g, u, "gelu_tanh"), F.gelu(g, approximate="tanh") * u,
                          atol=1e-6)
    assert torch.equal(gated(k, g[3:4], u[3:4], "silu"), gated(k, g, u, "silu")[3:4])
    # wide range and an odd length (the masked tail): relative error near float's, also in the
    # far negative tail, where torch's own 1 + tanh rounds tanh-gelu to 0 (so the reference
    # is the same function written as x * sigmoid(2z), in double)
    wide = torch.linspace(-40, 40, 10007).double()
    one = torch.ones_like(wide)
    gelu = wide * torch.sigmoid(2 * 0.7978845608028654 * (wide + 0.044715 * wide ** 3))
    # (gelu's argument 2z reaches -4600 at x = -40; float rounding of z alone moves
    # exp(2z) by up to |2z| * 6e-8 relative, hence the looser bound)
    for act, ref, rtol in (("silu", F.silu(wide), 1e-6), ("gelu_tanh", gelu, 1e-5)):
        got = gated(k, wide.float(), one.float(), act).double()
        assert torch.allclose(got, ref, rtol=rtol, atol=1e-30), act
        assert torch.equal(gated(k, wide[5:6].float(), one[5:6].float(), act), got[5:6].float())
    assert torch.isnan(gated(k, torch.tensor([float("nan")]), torch.ones(1), "silu")).all()
    gu = torch.randn(9, 2 * 260)          # the halves of a fused gate|up product, as views
    assert torch.equal(gated(k, gu[:, :260], gu[:, 260:], "silu"),
                       gated(k, gu[:, :260].contiguous(), gu[:, 260:].contiguous(), "silu"))
    assert torch.equal(k.gated_act(gu, "gelu_tanh"), gated(k, gu[:, :260], gu[:, 260:], "gelu_tanh"))


def gated(k, gate, up, act):
    """The kernel itself, on separate gate and up matrices."""
    g, u = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    return k.ops.gated_act(g, u, int(act != "silu")).view(gate.shape)


def _paged(k, kv_len: int, n_kv: int, d: int, block: int, seed: int):
    """A cache (in k's layout and dtype) holding kv_len tokens in shuffled blocks, plus the
    dense K/V as the cache holds them. Slots never written hold NaN: nothing may read them."""
    g = torch.Generator().manual_seed(seed)
    kd, vd = torch.randn(kv_len, n_kv, d, generator=g), torch.randn(kv_len, n_kv, d, generator=g)
    nb = -(-kv_len // block)
    table = torch.randperm(nb + 3, generator=g)[:nb]
    kc, vc = k.new_kv_cache(nb + 3, block, n_kv, d)
    for c in (kc, vc):                  # int8 values: codes -1, scales all-ones bits (NaN)
        c.fill_(float("nan") if c.is_floating_point() else -1)
    slots = table[torch.arange(kv_len) // block] * block + torch.arange(kv_len) % block
    k.write_kv(kc, vc, kd, vd, slots)
    kd, vd = k.read_kv(kc, vc, slots)
    return kd, vd, kc, vc, table


# heads per KV head 1 (6 tokens a call), 2, 3 (SmolLM2: 2 tokens a call), 4 and 5 (4 + 1);
# Gemma 2's soft-cap in one case
@pytest.mark.parametrize("window, L, H, KV, D, cap", [
    (None, 40, 4, 2, 64, 0.0), (7, 40, 4, 2, 64, 0.0), (None, 100, 9, 3, 64, 0.0),
    (33, 70, 4, 1, 256, 0.0), (None, 53, 2, 2, 32, 0.0), (9, 45, 5, 1, 32, 0.0),
    (None, 37, 6, 2, 64, 5.0),
    # head dims whose value sums end in a pass of 16 or 48 dims (80: 64 + 16; 48)
    (None, 30, 4, 2, 80, 0.0), (5, 33, 3, 1, 48, 0.0)])
@pytest.mark.parametrize("kv", ["float16", "int8-values"])
def test_attention_matches_sdpa_and_is_chunk_invariant(kv, window, L, H, KV, D, cap):
    """Against SDPA (on the keys and values as the cache holds them); a later chunk batched
    after another sequence and every query alone (a decode row) give the bits the query has in
    the whole chunk, where the kernel takes several of a chunk's tokens in one call."""
    k = CpuKernels(kv_cache_dtype=kv)
    BS = 16
    kd, vd, kc, vc, table = _paged(k, L, KV, D, BS, seed=1)
    q = torch.randn(L, H, D)
    meta = torch.tensor([[0, L, L]])
    out = k.attention(q.view(L, -1), kc, vc, table[None], meta, 0.125, window, cap).view(L, H, D)
    pos = torch.arange(L)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    if cap:
        kr, vr = kd.repeat_interleave(H // KV, 1), vd.repeat_interleave(H // KV, 1)
        s = torch.einsum("qhd,khd->hqk", q, kr) * 0.125
        s = (cap * torch.tanh(s / cap)).masked_fill(~mask, float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vr)
    else:
        ref = F.scaled_dot_product_attention(q.transpose(0, 1), kd.transpose(0, 1),
                                             vd.transpose(0, 1), attn_mask=mask, scale=0.125,
                                             enable_gqa=True).transpose(0, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    # the last 9 queries as a later chunk, batched after another sequence: identical bits
    other = torch.randn(5, H, D)
    qq = torch.cat([other, q[L - 9:]])
    meta2 = torch.tensor([[0, 5, 20], [5, 9, L]])
    tables = torch.stack([table, table])
    out2 = k.attention(qq.view(len(qq), -1), kc, vc, tables, meta2, 0.125, window,
                       cap).view(-1, H, D)
    assert torch.equal(out2[5:], out[L - 9:])
    # every query alone (a decode row) gives the bits it has in the whole chunk
    for t in range(L):
        one = k.attention(q[t].reshape(1, -1), kc, vc, table[None], torch.tensor([[0, 1, t + 1]]),
                          0.125, window, cap).view(H, D)
        assert torch.equal(one, out[t]), t


def test_int8_values_are_the_torch_arithmetic_to_the_bit():
    """--kv-cache-dtype int8-values: the fused cache write stores the keys as float16 (the
    bits of the float16 cache) and each value as codes and a scale per 16 dimensions, the
    bits write_kv's torch arithmetic gives; a value read back is within half a step of its
    16's largest magnitude; no other slot is written; the cache is 13/16 of float16's."""
    from ostinato.kernels.backend import make_ops
    from ostinato.model.config import Rope
    from ostinato.model.layers import rope_inv_freq, rope_tables
    i8, f16 = CpuKernels(kv_cache_dtype="int8-values"), CpuKernels()
    T, H, KV, D, slots_total = 7, 4, 2, 64, 48
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g)
    qkv[2, (H + KV) * D: (H + KV) * D + 16] = 0.0              # a 16 of zeros: scale 0
    qkv[3, (H + KV) * D + 5] = 300.0                           # an outlier in one 16
    qkv[4, (H + KV) * D + 20] = float("inf")                   # a 16 that reads back as NaN
    qkv[5, (H + KV) * D + 32: (H + KV) * D + 48] = 3e-38       # 127 / max|x| overflows: 0s
    cos, sin = rope_tables(torch.tensor([0, 1, 2, 9, 10, 300, 4095]), rope_inv_freq(Rope(1e4, D)))
    slots = torch.tensor([5, 6, 7, 20, 21, 40, 47])
    ours, theirs, half = i8.new_kv_cache(3, 16, KV, D), i8.new_kv_cache(3, 16, KV, D), \
        f16.new_kv_cache(3, 16, KV, D)
    for c in (*ours, *theirs, *half):
        c.fill_(float("nan") if c.is_floating_point() else -1)
    q = i8.qkv_rope_cache(qkv, None, None, 1e-6, cos, sin, True, H, *ours, slots)
    assert torch.equal(q, f16.qkv_rope_cache(qkv, None, None, 1e-6, cos, sin, True, H, *half,
                                             slots))
    assert torch.equal(ours[0].view(torch.int16), half[0].view(torch.int16))   # keys: float16
    v = qkv[:, (H + KV) * D:].reshape(T, KV, D)
    i8.write_kv(*theirs, i8.read_kv(*half, slots)[0], v, slots)
    assert torch.equal(ours[1], theirs[1])                     # values: the same codes, scales
    got = i8.read_kv(*ours, slots)[1]
    assert got[4, 0, 16:32].isnan().all() and not got[4, 0, :16].isnan().any()
    got[4, 0, 16:32] = v[4, 0, 16:32] = 0.0
    assert (got[5, 0, 32:48] == 0).all()                       # within 4e-37 of the truth
    got[5, 0, 32:48] = v[5, 0, 32:48] = 0.0
    step = v.unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True) / 127
    assert ((got - v).unflatten(-1, (-1, 16)).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (got[2, 0, :16] == 0).all() and got[3, 0, 5] == 300.0
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert i8.read_kv(*ours, torch.arange(slots_total)[untouched])[1].isnan().all()
    assert i8.kv_cache_bytes(16, KV, D) * 16 == f16.kv_cache_bytes(16, KV, D) * 13
    with pytest.raises(ValueError, match="int8-values.*kernels backend"):
        make_ops("torch", "int8-values")


@pytest.mark.model
def test_torch_reference_backend_agrees_but_kernels_are_the_invariant_ones(smollm_path):
    """The MKL/SDPA reference gives (nearly) the same scores; only the kernels promise bits."""
    from ostinato import LLM, SamplingParams
    ids = list(range(300, 360))
    p = SamplingParams(max_tokens=0, prompt_logprobs=1)
    ref = LLM(smollm_path, max_model_len=256, kv_cache_gb=0.02, backend="torch")
    ours = LLM(smollm_path, max_model_len=256, kv_cache_gb=0.02)
    a = ref.generate([ids], p)[0].prompt_logprobs
    b = ours.generate([ids], p)[0].prompt_logprobs
    for ea, eb in zip(a[1:], b[1:]):
        t = next(iter(ea.keys() & eb.keys()))
        assert ea[t].logprob == pytest.approx(eb[t].logprob, abs=5e-3)   # int16 activations


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope_cache_matches_the_torch_reference(k, neox, qk_norm):
    """The fused split + q/k norm + rotary + cache write equals the plain torch version."""
    from ostinato.kernels.reference import TorchOps
    from ostinato.model.config import Rope
    from ostinato.model.layers import rope_inv_freq, rope_tables
    T, H, KV, D, slots_total = 7, 4, 2, 64, 48
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g)
    qn, kn = (torch.randn(D, generator=g), torch.randn(D, generator=g)) if qk_norm else (None, None)
    cos, sin = rope_tables(torch.tensor([0, 1, 2, 9, 10, 300, 4095]), rope_inv_freq(Rope(10000.0, D)))
    slots = torch.tensor([5, 6, 7, 20, 21, 40, 47])
    ref_ops = TorchOps()
    ours, theirs = k.new_kv_cache(3, 16, KV, D), ref_ops.new_kv_cache(3, 16, KV, D)
    for c in (*ours, *theirs):
        c.fill_(float("nan"))
    got = k.qkv_rope_cache(qkv, qn, kn, 1e-6, cos, sin, neox, H, *ours, slots)
    ref = ref_ops.qkv_rope_cache(qkv, qn, kn, 1e-6, cos, sin, neox, H, *theirs, slots)
    assert got.shape == ref.shape == (T, H * D)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    # the cache holds float16: each value is the reference's rounded to nearest
    for o, t in zip(k.read_kv(*ours, slots), ref_ops.read_kv(*theirs, slots)):
        assert torch.allclose(o, t.half().float(), atol=1e-3, rtol=1e-3)
        if not qk_norm:                                         # same formula, same bits
            assert torch.equal(o, t.half().float())
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    for o in k.read_kv(*ours, torch.arange(slots_total)[untouched]):
        assert o.isnan().all()                                  # nothing else written
    if not qk_norm:
        assert torch.equal(got, ref)
