"""Each endpoint and field through the official `openai` client against the real server,
checked for what it means (not just a 200)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model
HI = [{"role": "user", "content": "Write a short poem about the sea."}]


def chat(client, server, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=server.model, messages=kw.pop("messages", HI), **kw)


def complete(client, server, prompt="The capital of France is", **kw):
    kw.setdefault("temperature", 0)
    return client.completions.create(model=server.model, prompt=prompt, **kw)


def test_models_and_health(client, server, http):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]            # the file stem by default
    assert models[0].max_model_len == server.max_model_len
    assert http.get("/health").json()["status"] == "ok"


def test_chat_usage_and_max_tokens(client, server, http):
    r = chat(client, server, max_tokens=6, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length" and r.usage.completion_tokens == 6
    ids = http.post("/tokenize", json={"messages": HI}).json()["tokens"]
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == len(ids) + 6
    again = chat(client, server, max_completion_tokens=6, extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == c.message.content   # greedy: deterministic


def test_default_max_tokens_is_the_rest_of_the_context(client, server):
    r = chat(client, server, messages=[{"role": "user", "content": "Hi"}])   # ~10 tokens
    assert r.choices[0].finish_reason == "stop"                 # EOS, not a 16-token default
    assert r.usage.completion_tokens < server.max_model_len - r.usage.prompt_tokens


def test_system_and_assistant_messages_shape_the_prompt(client, server, http):
    conv = [{"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"},
            {"role": "user", "content": "Who are you?"}]
    r = chat(client, server, messages=conv, max_tokens=2)
    tok = http.post("/tokenize", json={"messages": conv}).json()
    text = http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert "You are a pirate." in text and "Arr!" in text and text.rstrip().endswith("assistant")
    assert r.usage.prompt_tokens == tok["count"]


def test_stop_really_stops(client, server):
    full = complete(client, server, prompt="Count: 1, 2, 3,", max_tokens=12,
                    extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]              # a piece from the middle
    assert stop.strip(), full
    cut = complete(client, server, prompt="Count: 1, 2, 3,", max_tokens=12, stop=[stop])
    c = cut.choices[0]
    assert c.finish_reason == "stop" and c.text == full[:full.index(stop)]
    chunks = list(complete(client, server, prompt="Count: 1, 2, 3,", max_tokens=12, stop=[stop],
                           stream=True))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == c.text and stop not in streamed


def test_n_choices_and_seed_reproduces(client, server):
    kw = dict(prompt="My favourite animal is", max_tokens=5, n=3, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = complete(client, server, **kw), complete(client, server, **kw)
    ta, tb = [c.text for c in a.choices], [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert ta == tb                                              # same seed, same texts
    assert len(set(ta)) > 1                                      # n distinct draws
    other = [c.text for c in complete(client, server, **{**kw, "seed": 99}).choices]
    assert other != ta
    assert a.usage.completion_tokens == 15


def test_truncation_warpers_reduce_to_greedy(client, server):
    greedy = complete(client, server, max_tokens=6).choices[0].text
    for kw in ({"extra_body": {"top_k": 1}}, {"top_p": 1e-6}, {"extra_body": {"min_p": 1.0}}):
        r = complete(client, server, max_tokens=6, temperature=1.5, seed=5, **kw)
        assert r.choices[0].text == greedy, kw


def test_logit_bias_forces_a_token(client, server, http):
    tid = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}
                    ).json()["tokens"][0]
    r = complete(client, server, max_tokens=3, logit_bias={str(tid): 100}, logprobs=0)
    assert r.choices[0].text == " banana" * 3


def test_penalties_change_repetitive_output(client, server):
    prompt = "Repeat after me: the the the the the the the the"
    plain = complete(client, server, prompt=prompt, max_tokens=8).choices[0].text
    pen = complete(client, server, prompt=prompt, max_tokens=8, frequency_penalty=2.0,
                   presence_penalty=2.0).choices[0].text
    assert plain.count(" the") > pen.count(" the")
    rep = complete(client, server, prompt=prompt, max_tokens=8,
                   extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert rep != plain


def test_ignore_eos(client, server):
    msgs = [{"role": "user", "content": "Hi"}]
    short = chat(client, server, messages=msgs, max_tokens=30)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 27
    longer = chat(client, server, messages=msgs, max_tokens=n + 3, extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length"
    assert longer.usage.completion_tokens == n + 3


def test_chat_logprobs(client, server):
    r = chat(client, server, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0])               # greedy picks the top one
        assert bytes(e.bytes).decode() == e.token
    none = chat(client, server, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_echo_scores_the_prompt_like_lm_eval(client, server, http):
    """lm-eval's log-likelihood: echo + logprobs + max_tokens 0 (or 1)."""
    prompt = "The capital of France is Paris"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    r0 = complete(client, server, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = r0.choices[0].logprobs
    assert r0.choices[0].text == prompt and "".join(lp.tokens) == prompt
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:]) and lp.top_logprobs[0] is None
    r1 = complete(client, server, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.tokens) == len(ids) + 1
    assert lp1.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:])
    # the prompt's last token is scored as if it had been generated after the rest
    head = complete(client, server, prompt="The capital of France is", max_tokens=1, logprobs=1)
    assert head.choices[0].text == " Paris"
    assert head.choices[0].logprobs.token_logprobs[0] == pytest.approx(lp.token_logprobs[-1],
                                                                       abs=1e-4)


def test_completion_prompt_forms(client, server, http):
    ids = http.post("/tokenize", json={"prompt": "One, two,"}).json()["tokens"]
    by_text = complete(client, server, prompt="One, two,", max_tokens=4).choices[0].text
    by_ids = complete(client, server, prompt=ids, max_tokens=4).choices[0].text
    assert by_text == by_ids
    many = complete(client, server, prompt=["One, two,", "Red, green,"], max_tokens=4, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text
    assert many.choices[2].text != by_text
    as_lists = complete(client, server, prompt=[ids, ids], max_tokens=4)
    assert [c.text for c in as_lists.choices] == [by_text, by_text]
    echo = complete(client, server, prompt=ids, max_tokens=4, echo=True).choices[0].text
    assert echo == "One, two," + by_text


def test_fields_that_ask_for_nothing_are_accepted(http, server):
    """Identifiers, and the refused fields' values that ask for nothing, are a 200 (every
    other field outside the schema is a 400: test_conformance.py)."""
    r = http.post("/v1/chat/completions", json={
        "model": server.model, "messages": HI, "max_tokens": 2, "temperature": 0,
        "user": "someone", "safety_identifier": "x", "prompt_cache_key": "k", "tools": [],
        "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
        "modalities": ["text"], "service_tier": "auto"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_tokenize_detokenize(http, server):
    with_bos = http.post("/tokenize", json={"model": server.model, "prompt": "Hello world"}).json()
    plain = http.post("/tokenize", json={"prompt": "Hello world",
                                         "add_special_tokens": False}).json()
    assert with_bos["count"] == len(with_bos["tokens"])
    assert with_bos["max_model_len"] == server.max_model_len
    assert with_bos["tokens"][-len(plain["tokens"]):] == plain["tokens"]
    back = http.post("/detokenize", json={"tokens": plain["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


def test_raw_stream_format(http, server):
    """data: {json}\\n\\n events, role first, one finish_reason, usage with choices [], DONE."""
    body = {"model": server.model, "messages": HI, "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("length") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


def test_head_of_the_base_url(server):
    """Clients probe the base URL with HEAD before their first request (Claude Code does)."""
    import httpx
    assert httpx.head(server.base + "/", timeout=30).status_code == 200
