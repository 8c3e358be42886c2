"""The offline API on the real SmolLM2 model: shapes, meanings and vLLM-compatible names."""
from __future__ import annotations

import math

import pytest

from ostinato import SamplingParams

pytestmark = pytest.mark.model
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(smollm_llm):
    return smollm_llm


def test_prompt_forms(llm):
    ids = llm.tokenize("The capital of France is", add_special_tokens=False)
    by_text = llm.generate("The capital of France is", GREEDY)[0]
    by_ids = llm.generate([ids], GREEDY)[0]
    assert by_text.prompt_token_ids == ids == by_ids.prompt_token_ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert "Paris" in by_text.outputs[0].text
    assert by_text.prompt == "The capital of France is" and by_ids.prompt is None
    many = llm.generate(["One, two,", "Red, green,"], [GREEDY, GREEDY])
    assert [o.request_id for o in many] != [None, None] and len(many) == 2


def test_max_tokens_and_finish_reason(llm):
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=5,
                                                         ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert out.text == llm.detokenize(out.token_ids, skip_special_tokens=True)


def test_eos_stops_chat(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}],
                   SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in out.text and out.text.strip()


def test_stop_string_really_stops(llm):
    free = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=16))[0]
    text = free.outputs[0].text
    assert " 5," in text, text
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=16,
                                                         stop=[" 5,"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 5,"
    assert out.text == text[: text.index(" 5,")]
    kept = llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=16, stop=[" 5,"], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[: text.index(" 5,") + 3]


def test_stop_token_ids(llm):
    free = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=8))[0]
    target = free.outputs[0].token_ids[3]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=[target]))[0].outputs[0]
    assert out.token_ids == free.outputs[0].token_ids[: free.outputs[0].token_ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_seed_reproduces_and_top_k_1_is_greedy(llm):
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    a = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    b = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    c = llm.generate("Once upon a time", SamplingParams(
        temperature=1.0, max_tokens=16, seed=99, ignore_eos=True))[0].outputs[0].token_ids
    assert a == b and a != c
    greedy = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16,
                                                             ignore_eos=True))[0]
    top1 = llm.generate("Once upon a time", SamplingParams(temperature=0.9, top_k=1, seed=5,
                                                           max_tokens=16, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == top1.outputs[0].token_ids


def test_n_choices(llm):
    out = llm.generate("My favourite colour is", SamplingParams(
        n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logprobs(llm):
    out = llm.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    total = 0.0
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1       # greedy picks the top token
        assert 3 <= len(entry) <= 4 and {lp.rank for lp in entry.values()} >= {1, 2, 3}
        assert entry[tok].decoded_token == llm.detokenize([tok])
        assert sum(math.exp(lp.logprob) for lp in entry.values()) <= 1.0 + 1e-5
        total += entry[tok].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_prompt_logprobs(llm):
    ids = llm.tokenize("The capital of France is Paris", add_special_tokens=False)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    pl = out.prompt_logprobs
    assert len(pl) == len(ids) and pl[0] is None
    for t in range(1, len(ids)):
        assert ids[t] in pl[t] and any(lp.rank == 1 for lp in pl[t].values())
        assert all(lp.logprob <= 0 for lp in pl[t].values())
    assert pl[-1][ids[-1]].rank == 1            # " Paris" is the model's top guess here
    # max_tokens=0 scores the prompt and generates nothing (lm-eval's loglikelihood)
    small = llm.generate([ids], SamplingParams(temperature=0, max_tokens=0,
                                               prompt_logprobs=2))[0]
    assert small.outputs[0].token_ids == []
    for a, b in zip(pl[1:], small.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].logprob == pytest.approx(b[k].logprob, abs=1e-4)


def test_stream_equals_generate(llm):
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    streamed = "".join(llm.stream("Write a haiku about rain:", p))
    assert streamed == llm.generate("Write a haiku about rain:", p)[0].outputs[0].text


def test_bad_requests(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**9]], GREEDY)
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * (llm.max_model_len + 1)], GREEDY)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished()


def test_fault_in_one_sequence_fails_it_alone(llm, monkeypatch):
    """A fault in one request's own sampling fails that request; its neighbour in the same
    steps is untouched and the blocks come back."""
    import ostinato.engine.runner as runner_mod
    real = runner_mod.sample

    def sample(logits, params, gen):
        if params.seed == 666:
            raise RuntimeError("injected sampling fault")
        return real(logits, params, gen)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate("One, two, three,", p)[0].outputs[0].token_ids
    monkeypatch.setattr(runner_mod, "sample", sample)
    bad = SamplingParams(temperature=0.5, max_tokens=6, seed=666)
    outs = llm.generate(["One, two, three,", "Red, green,"], [p, bad])
    assert outs[0].outputs[0].token_ids == alone
    assert outs[1].outputs[0].finish_reason == "error" and outs[1].outputs[0].token_ids == []
    llm.engine.scheduler.check_integrity()
    assert llm.engine.scheduler.kv.usage() == 0.0


@pytest.mark.model
def test_a_refused_prompt_leaves_nothing_queued(smollm_llm):
    """generate() with a prompt the engine refuses (here: too long for the context) raises,
    and the prompts added before it are aborted, not left to run in the next call."""
    llm = smollm_llm
    ok = llm.tokenize("Hello there")
    with pytest.raises(ValueError):
        llm.generate([ok, ok, list(range(1, llm.max_model_len + 10))],
                     SamplingParams(temperature=0, max_tokens=4))
    assert not llm.engine.has_unfinished() and not llm.engine.seqs
    out = llm.generate([ok], SamplingParams(temperature=0, max_tokens=4))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 4
