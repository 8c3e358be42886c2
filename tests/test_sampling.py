"""Sampling parameters, logits processors and the sampler.

The processors are compared bit-for-bit (torch.equal) with HF transformers' logits
processors where the maths is the same. Intended differences from HF, checked below
where they matter:
  * we mask with -inf, which is also HF's default filter_value;
  * top_p / min_p always keep the top token: HF's default min_tokens_to_keep=1;
  * our logit_bias is single-token only (HF's SequenceBias also supports sequences).
"""
from __future__ import annotations

import math

import pytest
import torch

from ostinato.sampling import (
    Logprob,
    SamplingParams,
    apply_frequency_presence_penalties,
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    greedy_choices,
    make_generator,
    process_logits,
    random_sample,
    sample,
    top_logprobs,
)

VOCAB = 1000


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


@pytest.fixture(scope="module")
def hf():
    """HF transformers' logits processors (a reference peer, not a runtime dependency)."""
    return pytest.importorskip("transformers.generation.logits_process")


def hf_apply(processor, logits: torch.Tensor, input_ids: list[int] | None = None) -> torch.Tensor:
    """Run an HF processor on one row: HF wants input_ids [1, L] and scores [1, V]."""
    ids = torch.tensor([input_ids or [0]], dtype=torch.long)
    return processor(ids, logits.clone().unsqueeze(0)).squeeze(0)


# ------------------------------------------------------------------ greedy and seeds

@pytest.mark.parametrize("seed", range(40))
def test_top_k_1_with_temperature_equals_greedy(seed):
    logits = random_logits(seed)
    params = SamplingParams(temperature=0.8, top_k=1, seed=seed)
    assert params.greedy
    expected = int(torch.argmax(logits))
    processed = process_logits(logits, params, [], [])
    assert sample(processed, params, make_generator(seed)) == expected
    # The random path must agree too: after top_k=1 only one token has mass.
    warped = apply_top_k(apply_temperature(logits, 0.8), 1)
    assert torch.isfinite(warped).sum() == 1
    assert random_sample(warped, make_generator(seed)) == expected


def test_greedy_ties_pick_lowest_id():
    logits = torch.tensor([0.0, 5.0, 1.0, 5.0, 5.0])
    assert sample(logits, SamplingParams(temperature=0.0), None) == 1


def draw_sequence(seed: int | None, steps: int = 60) -> list[int]:
    params = SamplingParams(temperature=1.0, seed=seed)
    gen = make_generator(params.seed)
    return [sample(random_logits(step, scale=1.0), params, gen) for step in range(steps)]


def test_same_seed_reproduces_and_different_seeds_differ():
    a = draw_sequence(1234)
    assert a == draw_sequence(1234)
    assert a != draw_sequence(4321)
    assert draw_sequence(None) != draw_sequence(None)   # OS entropy: collision ~ impossible
    assert len(set(a)) > 10                              # really random, not stuck


def test_seeded_stream_does_not_depend_on_other_requests():
    alone = draw_sequence(7, steps=30)
    params = SamplingParams(temperature=1.0, seed=7)
    mine, other = make_generator(7), make_generator(99)
    interleaved = []
    for step in range(30):
        interleaved.append(sample(random_logits(step, scale=1.0), params, mine))
        sample(random_logits(step + 500, vocab=37), params, other)   # another request's step
    assert interleaved == alone


def test_sample_with_no_generator_uses_params_seed():
    logits = random_logits(3, scale=1.0)
    params = SamplingParams(seed=11)
    assert sample(logits, params, None) == sample(logits, params, make_generator(11))


def test_sample_refuses_fully_masked_logits():
    with pytest.raises(ValueError, match="masked"):
        random_sample(torch.full((4,), float("-inf")), make_generator(0))


# -------------------------------------------------------------- against HF processors

@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_hf(hf, penalty):
    logits = random_logits(1)
    logits[5] = 0.0                                       # zero stays zero either way
    prompt = [5, 17, 17, 400, 999, 3]
    output = [17, 42, 42, 0]
    ours = process_logits(logits, SamplingParams(temperature=0.0, repetition_penalty=penalty),
                          prompt, output)
    theirs = hf_apply(hf.RepetitionPenaltyLogitsProcessor(penalty), logits, prompt + output)
    assert torch.equal(ours, theirs)
    assert torch.equal(apply_repetition_penalty(logits, prompt + output, penalty), theirs)
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[prompt + output] = False
    assert torch.equal(ours[untouched], logits[untouched])
    assert not torch.equal(ours, logits)


def test_repetition_penalty_direction():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]     # positive divided, negative multiplied, once


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 2.0])
def test_temperature_matches_hf(hf, temperature):
    logits = random_logits(2)
    theirs = hf_apply(hf.TemperatureLogitsWarper(temperature), logits)
    assert torch.equal(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("k", [1, 2, 10, 50, VOCAB - 1, VOCAB, VOCAB + 5])
def test_top_k_matches_hf(hf, k):
    logits = random_logits(3)
    theirs = hf_apply(hf.TopKLogitsWarper(k), logits)
    ours = apply_top_k(logits, k)
    assert torch.equal(ours, theirs)
    assert int(torch.isfinite(ours).sum()) == min(k, VOCAB)


def test_top_k_keeps_ties_like_hf(hf):
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    ours = apply_top_k(logits, 2)
    assert torch.equal(ours, hf_apply(hf.TopKLogitsWarper(2), logits))
    assert torch.isfinite(ours).tolist() == [False, True, True, True, False]


def test_top_k_off():
    logits = random_logits(4)
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, -1), logits)


@pytest.mark.parametrize("top_p", [0.01, 0.1, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("seed", [5, 6])
def test_top_p_matches_hf(hf, top_p, seed):
    logits = random_logits(seed)
    ours = apply_top_p(logits, top_p)
    assert torch.equal(ours, hf_apply(hf.TopPLogitsWarper(top_p), logits))
    kept = torch.isfinite(ours)
    assert kept[torch.argmax(logits)]                      # top token always survives
    assert float(torch.softmax(logits, -1)[kept].sum()) >= top_p - 1e-6


def test_top_p_keeps_top_token_when_it_alone_exceeds_p():
    logits = torch.tensor([10.0, 0.0, 0.0, 0.0])
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [True, False, False, False]


def test_tiny_top_p_still_keeps_the_top_token(hf):
    # 1 - 1e-9 rounds to 1.0 in fp32, so every cumulative mass is "<= 1 - top_p":
    # only the explicit keep-the-top rule saves the most likely token.
    logits = random_logits(11)
    ours = apply_top_p(logits, 1e-9)
    assert torch.equal(ours, hf_apply(hf.TopPLogitsWarper(1e-9), logits))
    assert torch.isfinite(ours).nonzero().flatten().tolist() == [int(torch.argmax(logits))]


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.05, 0.2, 0.9, 1.0])
def test_min_p_matches_hf(hf, min_p):
    logits = random_logits(7, scale=1.5)
    ours = apply_min_p(logits, min_p)
    assert torch.equal(ours, hf_apply(hf.MinPLogitsWarper(min_p), logits))
    if 0 < min_p <= 0.2:
        assert 1 < int(torch.isfinite(ours).sum()) < VOCAB


def test_logit_bias_matches_hf_sequence_bias(hf):
    logits = random_logits(8)
    bias = {3: 5.5, 10: -100.0, 999: 0.1, 0: 100.0}
    ours = apply_logit_bias(logits, bias)
    theirs = hf_apply(hf.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}), logits)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, logits)
    params = SamplingParams(temperature=0.0, logit_bias=bias)
    assert torch.equal(process_logits(logits, params, [1, 2], [3]), theirs)


def test_logit_bias_rejects_out_of_vocab_token():
    with pytest.raises(ValueError, match=r"logit_bias.*\[0, 10\)"):
        apply_logit_bias(torch.zeros(10), {10: 1.0})


@pytest.mark.parametrize("seed", range(4))
def test_full_warper_chain_matches_hf(hf, seed):
    """penalty -> temperature -> top_k -> top_p -> min_p, as HF chains them."""
    logits = random_logits(100 + seed)
    history = [1, 2, 3, 2, 50, 700]
    params = SamplingParams(temperature=0.7, top_k=60, top_p=0.9, min_p=0.02,
                            repetition_penalty=1.2)
    chain = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.2),
        hf.TemperatureLogitsWarper(0.7),
        hf.TopKLogitsWarper(60),
        hf.TopPLogitsWarper(0.9),
        hf.MinPLogitsWarper(0.02),
    ])
    theirs = chain(torch.tensor([history]), logits.clone().unsqueeze(0)).squeeze(0)
    ours = process_logits(logits, params, history[:2], history[2:])
    assert torch.equal(ours, theirs)
    assert 1 < int(torch.isfinite(ours).sum()) <= 60


# ------------------------------------------------------- penalties without an HF twin

def test_frequency_presence_penalties_exact():
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.0])
    output = [1, 1, 2, 4]                      # counts: t1=2, t2=1, t4=1
    out = apply_frequency_presence_penalties(logits, output, 0.5, 0.25)
    # logit - (0.5 * count + 0.25 * [count > 0]); all values are exact in fp32.
    assert out.tolist() == [1.0, 2.0 - 1.25, -1.0 - 0.75, 0.5, 0.0 - 0.75]
    negative = apply_frequency_presence_penalties(logits, output, -1.0, 0.0)
    assert negative.tolist() == [1.0, 4.0, 0.0, 0.5, 1.0]
    assert torch.equal(apply_frequency_presence_penalties(logits, [], 2.0, 2.0), logits)


def test_frequency_presence_ignore_prompt_tokens():
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.0])
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5)
    out = process_logits(logits, params, prompt_ids=[0, 3, 3, 1], output_ids=[1])
    assert out.tolist() == [1.0, 0.5, -1.0, 0.5, 0.0]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(6)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    early = process_logits(logits, params, [0], [1], eos_ids=[5])
    assert torch.isinf(early).tolist() == [False, False, False, False, True, True]
    late = process_logits(logits, params, [0], [1, 2], eos_ids=[5])
    assert torch.equal(late, logits)
    assert torch.equal(apply_min_tokens(logits, 0, 0, [5]), logits)


def test_process_logits_does_not_modify_input():
    logits = random_logits(9)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=5, top_p=0.5, min_p=0.1,
                            repetition_penalty=1.5, frequency_penalty=1.0,
                            presence_penalty=1.0, logit_bias={1: 3.0}, min_tokens=3)
    out = process_logits(logits, params, [1, 2], [3, 3], eos_ids=[0])
    assert torch.equal(logits, before)
    assert out is not logits
    assert process_logits(logits, SamplingParams(), [], []) is not logits


# ---------------------------------------------------------------- sampled frequencies

def assert_frequencies_match(logits: torch.Tensor, params: SamplingParams, draws: int = 20000):
    """Each token's empirical frequency lies within 4 sigma of its softmax probability."""
    processed = process_logits(logits, params, [], [])
    probs = torch.softmax(processed, -1).double()
    gen = make_generator(params.seed)
    counts = torch.zeros(len(logits), dtype=torch.float64)
    for _ in range(draws):
        counts[sample(processed, params, gen)] += 1
    freq = counts / draws
    for token, (p, f) in enumerate(zip(probs.tolist(), freq.tolist())):
        if p == 0.0:
            assert f == 0.0, f"masked token {token} was drawn"
            continue
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(f - p) <= 4 * sigma, f"token {token}: freq {f:.4f} vs prob {p:.4f}"
    return probs


def test_sampled_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0])
    probs = assert_frequencies_match(logits, SamplingParams(temperature=1.0, seed=0))
    assert bool((probs > 0.02).all())   # every token has real mass


def test_sampled_frequencies_with_temperature_top_k_top_p():
    logits = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0])
    probs = assert_frequencies_match(logits, SamplingParams(temperature=0.7, top_k=3, seed=1))
    assert (probs == 0).tolist() == [False, False, False, True, True]
    probs = assert_frequencies_match(logits, SamplingParams(top_p=0.75, seed=2))
    assert (probs == 0).tolist() == [False, True, False, True, True]


# ----------------------------------------------------------------------- logprobs

def test_top_logprobs_values_and_ranks():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 0.5])
    expected = torch.log_softmax(logits.double(), -1)
    chosen = 4                                  # least likely token: rank 6
    out = top_logprobs(logits, 2, chosen)
    assert list(out) == [4, 1, 3]
    for tid, rank in ((1, 1), (3, 2), (4, 6)):
        assert out[tid].rank == rank and out[tid].decoded_token is None
        assert out[tid].logprob == pytest.approx(float(expected[tid]), abs=1e-6)
    inside = top_logprobs(logits, 3, 3)         # chosen token already in the top 3
    assert [(t, lp.rank) for t, lp in inside.items()] == [(3, 2), (1, 1), (2, 3)]
    assert list(top_logprobs(logits, 0, 2)) == [2]


@pytest.mark.parametrize("vocab", [5, 16, 49152, 262144 + 3])
def test_top_logprobs_match_a_double_log_softmax_on_large_vocabularies(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(vocab, generator=g) * 4
    logits[vocab // 3] = float("-inf")          # a masked token: probability 0
    expected = torch.log_softmax(logits.double(), -1)
    for tid in (0, vocab - 1, int(logits.argmax()), vocab // 3):
        out = top_logprobs(logits, min(3, vocab), tid)
        assert out[tid].rank == int((expected > expected[tid]).sum()) + 1
        for t, lp in out.items():
            assert lp.logprob == pytest.approx(float(expected[t]), abs=2e-6)


def test_top_logprobs_of_a_broken_row_are_nan():
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(40)
        logits[7] = bad
        assert math.isnan(top_logprobs(logits, 0, 3)[3].logprob)
    assert math.isnan(top_logprobs(torch.full((9,), float("-inf")), 0, 2)[2].logprob)


def test_greedy_choices_equal_sample_and_top_logprobs_row_by_row():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 1000 + 5, generator=g) * 3
    logits[1, 17] = logits[1, 900] = logits[1].max() + 1       # a tie: the first index wins
    logits[2, 3] = float("nan")                                # the per-row way takes it
    logits[3, 8] = float("inf")
    logits[4] = float("-inf")
    got = greedy_choices(logits)
    assert got[1][0] == 17 and got[2] is None and got[3] is None and got[4] is None
    p = SamplingParams(temperature=0.0)
    for row, choice in zip(logits, got):
        if choice is not None:
            token = sample(process_logits(row, p, [], []), p, None)
            assert choice == (token, top_logprobs(row, 0, token)[token].logprob)


def test_logprob_is_frozen():
    lp = Logprob(-0.5, 1, "a")
    with pytest.raises(Exception):
        lp.rank = 2  # type: ignore[misc]


# --------------------------------------------------------------------- validation

def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None and p.seed is None
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    # each id once, in order: 2M repeats were scanned for every token generated
    assert SamplingParams(stop_token_ids=[7, 3, 7] * 1000).stop_token_ids == [7, 3]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(logit_bias={"12": 3}).logit_bias == {12: 3.0}
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert SamplingParams(max_tokens=0, prompt_logprobs=1).max_tokens == 0
    assert SamplingParams(max_tokens=None).max_tokens is None


BAD_PARAMS = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("n", 0), ("n", 1.0),
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", "16"),
    ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.5),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21),
    ("logit_bias", {1: 100.5}), ("logit_bias", {1: -101}), ("logit_bias", {"x": 1.0}),
    ("logit_bias", {-1: 1.0}), ("logit_bias", [1, 2]), ("logit_bias", {1: "a"}),
    ("seed", 1.5), ("seed", "42"),
    ("stop", 5), ("stop", ["a", 1]), ("stop", [""]),
    ("stop_token_ids", [1, -2]), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_validation_errors_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert field in message
    assert repr(value) in message or str(value) in message


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match="min_tokens=20.*max_tokens"):
        SamplingParams(min_tokens=20, max_tokens=10)


def test_apply_temperature_zero_rejected():
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(torch.zeros(3), 0.0)
