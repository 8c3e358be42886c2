"""--prompt-bf16: prompt positions' dense matmuls on AMX bfloat16 tiles, generated positions on
the int16 path; --dtype bfloat16: every position on the tiles, the weights converted once at
load. The path is chosen by position, so every invariant still holds: a row's bits do not
depend on the batch, the chunking of its prompt or the prefix cache."""
from __future__ import annotations

import pytest
import torch

from ostinato.engine.kv_cache import KVCacheManager
from ostinato.kernels.backend import CpuKernels, QWeight, qw_of

from test_kernels import _cpu_flags, packed
from test_kv_cache import admit, make_seq

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def k():
    return CpuKernels()


def _bf16_here(k) -> bool:
    has = k.ops.amx_bf16_available()
    if not {"amx_bf16", "avx512_bf16"} <= _cpu_flags():
        assert not has                  # nothing claims tiles the CPU (or build) lacks
    return has


def _bf16_reference(x: torch.Tensor, p) -> tuple[torch.Tensor, torch.Tensor]:
    """The product of x and the weights each rounded to bfloat16, in float64, and the sum of
    the terms' magnitudes (the scale of a float32 accumulation's error)."""
    xb = x.bfloat16().double()
    wb = torch.from_numpy(p.dequantize()).bfloat16().double()
    return xb @ wb.T, xb.abs() @ wb.abs().T


@pytest.mark.parametrize("type_name", TYPES)
def test_bf16_rows_are_the_bfloat16_product_and_batch_invariant(k, type_name):
    if not _bf16_here(k):
        pytest.skip("this CPU has no AMX-BF16")
    for N in (96, 37):                                   # 37: a ragged last weight group
        _, p = packed(type_name, N=N, seed=N)
        w = QWeight.from_packed(p)
        qw = qw_of(w)
        x = torch.randn(70, 512)
        x[3, 32:64] = 0.0
        ones = torch.ones(70, dtype=torch.uint8)
        full = k.ops.qlinear_rows(x, qw, ones)
        ref, scale = _bf16_reference(x, p)
        assert ((full.double() - ref).abs() <= 1e-4 * scale + 1e-30).all()
        int16 = k.linear(x, w)
        assert not torch.equal(full, int16)              # the bfloat16 path did run
        for m in (1, 5, 16, 17, 33):                     # x tiles of every fill
            for start in (0, 70 - m):
                rows = torch.ones(m, dtype=torch.uint8)
                assert torch.equal(k.ops.qlinear_rows(x[start:start + m].contiguous(), qw, rows),
                                   full[start:start + m])
        mixed = torch.tensor([i % 3 == 0 for i in range(70)], dtype=torch.uint8)
        got = k.ops.qlinear_rows(x, qw, mixed)
        assert torch.equal(got[mixed.bool()], full[mixed.bool()])
        assert torch.equal(got[~mixed.bool()], int16[~mixed.bool()])
        torch.set_num_threads(1)
        try:
            assert torch.equal(k.ops.qlinear_rows(x, qw, ones), full)
        finally:
            torch.set_num_threads(2)


@pytest.mark.parametrize("type_name", TYPES)
def test_weights_converted_once_give_the_same_bits(k, type_name):
    """--dtype bfloat16 converts the weights at load (QW.pack_bf16) instead of in each call:
    the tiles then read them from memory, ahead by a prefetch, and the bits are the same."""
    if not _bf16_here(k):
        pytest.skip("this CPU has no AMX-BF16")
    for N in (96, 37, 48):               # 37: a ragged group; 48: an odd number of groups
        _, p = packed(type_name, N=N, seed=N + 1)
        w = QWeight.from_packed(p)
        fly, once = qw_of(w), qw_of(w)
        once.pack_bf16()
        assert fly.packed_bytes == 0 and once.packed_bytes == 2 * ((N + 31) // 32 * 32) * 512
        x = torch.randn(70, 512)
        for m in (1, 16, 17, 70):
            rows = torch.ones(m, dtype=torch.uint8)
            xm = x[:m].contiguous()
            assert torch.equal(k.ops.qlinear_rows(xm, once, rows),
                               k.ops.qlinear_rows(xm, fly, rows))
        mixed = torch.tensor([i % 3 == 0 for i in range(70)], dtype=torch.uint8)
        assert torch.equal(k.ops.qlinear_rows(x, once, mixed), k.ops.qlinear_rows(x, fly, mixed))
        once.packed.zero_()                  # the tiles read the copy, not the codes
        assert not k.ops.qlinear_rows(x, once, torch.ones(70, dtype=torch.uint8)).any()


def test_a_row_mask_of_the_wrong_length_is_refused(k):
    _, p = packed("Q4_1")
    qw = qw_of(QWeight.from_packed(p))
    with pytest.raises(RuntimeError, match="row mask"):
        k.ops.qlinear_rows(torch.randn(4, 512), qw, torch.ones(3, dtype=torch.uint8))


def test_generated_blocks_are_cached_apart_from_prompt_blocks():
    """Under split paths a block holding a generated position was computed on the int16
    path: a later prompt with the same tokens (a chat's next turn) must not reuse it."""
    for split, hit in ((False, 12), (True, 8)):
        kv = KVCacheManager([16], 4, [None], split_paths=split)
        a = make_seq("a", range(10))
        admit(kv, a, 10)
        a.num_computed_tokens = 10
        for t in (100, 101, 102):                        # three generated tokens
            a.output_ids.append(t)
            kv.allocate(a, a.num_tokens)
            a.num_computed_tokens = a.num_tokens - 1
        kv.allocate(a, a.num_tokens)                     # registers the full blocks
        b = make_seq("b", list(range(10)) + [100, 101, 102, 7, 8])
        assert kv.find_cached_prefix(b) == hit           # blocks 0-1 are all prompt
        kv.check_integrity()


def test_prompt_bf16_is_refused_where_it_cannot_run(smollm_path):
    from ostinato import LLM
    for kw in ({"prompt_bf16": True}, {"dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="kernels backend"):
            LLM(str(smollm_path), backend="torch", **kw)
        if not CpuKernels().ops.amx_bf16_available():
            with pytest.raises(ValueError, match="AMX-BF16"):
                LLM(str(smollm_path), **kw)
    for dtype in ("float16", "float32", "half", "bf16"):     # not ignored: refused
        with pytest.raises(ValueError, match="dtype"):
            LLM(str(smollm_path), dtype=dtype)
    with pytest.raises(ValueError, match="choose one"):       # generated tokens: int16 or not
        LLM(str(smollm_path), prompt_bf16=True, dtype="bfloat16")


def test_prompt_bf16_keeps_every_invariant(smollm_path):
    """Batch == alone == prompt chunked by 32 tokens == served from the prefix cache, tokens
    and log-probabilities to the bit; the prompt's path differs from the int16 one (the
    first token's log-probability), the greedy text mostly does not."""
    if not CpuKernels().ops.amx_bf16_available():
        pytest.skip("this CPU has no AMX-BF16")
    from ostinato import LLM
    from ostinato.bench.latency import synthetic_words
    from ostinato.params import SamplingParams
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [synthetic_words(20 + 25 * i, 300 + i) for i in range(5)]

    def run(llm, ps):
        return [(o.outputs[0].token_ids, [float(lp[t].logprob) for t, lp in
                                          zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
                for o in llm.generate(ps, sp)]
    batched = LLM(str(smollm_path), prompt_bf16=True)
    chunked = LLM(str(smollm_path), prompt_bf16=True, max_num_batched_tokens=32,
                  enable_prefix_caching=False)
    first = run(batched, prompts)
    assert [run(chunked, [p])[0] for p in prompts] == first
    assert run(batched, prompts) == first                # now from the prefix cache
    plain = run(LLM(str(smollm_path)), prompts)
    assert all(a[1][0] != b[1][0] for a, b in zip(first, plain))
    assert sum(a[0] == b[0] for a, b in zip(first, plain)) >= 4


def test_prompt_bf16_recomputes_a_preempted_sequence_to_the_bit(smollm_path):
    """A preempted sequence is recomputed from its prompt and output: each position takes
    its own path again (prompt on bfloat16, generated on int16), so its tokens and their
    log-probabilities are what an engine with room to spare gives."""
    if not CpuKernels().ops.amx_bf16_available():
        pytest.skip("this CPU has no AMX-BF16")
    from ostinato import LLM
    from ostinato.params import SamplingParams
    big = LLM(str(smollm_path), prompt_bf16=True, max_model_len=128, kv_cache_gb=0.05)
    c = big.config
    per_layer = big.engine.runner.model.ops.kv_cache_bytes(16, c.n_kv_heads, c.head_dim)
    tiny = LLM(str(smollm_path), prompt_bf16=True, max_model_len=128,
               kv_cache_gb=16.5 * c.n_layers * per_layer / (1 << 30))   # 15 usable blocks
    prompts = [f"Write a short poem about the {w} and the sea." for w in
               ("moon", "river", "forest", "city", "desert", "storm", "garden", "harbor")]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)

    def run(llm):
        return [(o.outputs[0].token_ids, [float(lp[t].logprob) for t, lp in
                                          zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
                for o in llm.generate(prompts, sp)]
    got = run(tiny)
    assert tiny.engine.stats.preemptions > 0
    assert got == run(big)


def test_dtype_bfloat16_keeps_every_invariant(smollm_path):
    """Every position on the tiles, the LM head too: a batch == each prompt alone, chunked
    by 32 tokens == from the prefix cache, to the bit (tokens, their log-probabilities and
    the prompt's); neither the int16 path's nor --prompt-bf16's bits."""
    if not CpuKernels().ops.amx_bf16_available():
        pytest.skip("this CPU has no AMX-BF16")
    from ostinato import LLM
    from ostinato.bench.latency import synthetic_words
    from ostinato.params import SamplingParams
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0,
                        prompt_logprobs=0)
    prompts = [synthetic_words(20 + 25 * i, 400 + i) for i in range(5)]

    def run(llm, ps):
        return [(o.outputs[0].token_ids,
                 [float(lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids,
                                                        o.outputs[0].logprobs)],
                 [float(next(iter(d.values())).logprob) for d in o.prompt_logprobs[1:]])
                for o in llm.generate(ps, sp)]
    batched = LLM(str(smollm_path), dtype="bfloat16")
    model = batched.engine.runner.model
    assert model.ops._qw(model.lm_head).packed_bytes > 0  # the LM head takes the tiles
    chunked = LLM(str(smollm_path), dtype="bfloat16", max_num_batched_tokens=32,
                  enable_prefix_caching=False)
    first = run(batched, prompts)
    assert [run(chunked, [p])[0] for p in prompts] == first
    assert run(batched, prompts) == first                # now from the prefix cache
    for other in (LLM(str(smollm_path), prompt_bf16=True), LLM(str(smollm_path))):
        theirs = run(other, prompts)
        assert all(a[1] != b[1] and a[2] != b[2] for a, b in zip(first, theirs))
        assert sum(a[0] == b[0] for a, b in zip(first, theirs)) >= 4
        assert other.fingerprint() != batched.fingerprint()   # other bits, another print
