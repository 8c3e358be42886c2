"""Speculative decoding through the real server and the official openai client: the same
tokens and logprobs as a server without it, OpenAI's accepted/rejected prediction tokens in
usage (agreeing with /metrics), vLLM's spec_decode counters, and the CLI flags."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from conftest import API_KEY, MAX_MODEL_LEN, Server
from prometheus_client.parser import text_string_to_metric_families
from serverproc import start_server, stop_server

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He "
             "trimmed the wick, polished the great lens, and wound the clockwork that turned "
             "the light. Ships far out at sea saw the beam sweep across the water and knew "
             "where the rocks were hidden.")
MESSAGES = [{"role": "user", "content": "Repeat the following paragraph exactly, word for "
             f"word, and nothing else:\n\n{PARAGRAPH}"}]
MAX_TOKENS = 96
SPEC = "ostinato:spec_decode_num_"


@pytest.fixture(scope="module")
def spec_server(smollm_path):
    proc = start_server(smollm_path, "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gb",
                        "0.25", "--api-key", API_KEY, "--speculative", "ngram")
    try:
        yield Server(proc.base, proc.model, proc.log_path)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def spec_client(spec_server):
    import openai
    return openai.OpenAI(base_url=spec_server.v1, api_key=API_KEY, max_retries=0, timeout=120)


def spec_metrics(base: str) -> dict[str, float]:
    """The spec_decode samples: name -> value, per-position ones as name[position]."""
    out = {}
    text = httpx.get(base + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(SPEC) and s.name.endswith("_total"):
                pos = s.labels.get("position")
                out[s.name + (f"[{pos}]" if pos is not None else "")] = s.value
    return out


def settled_delta(base: str, before: dict, drafted: int, timeout: float = 10.0) -> dict:
    """Counter increments since `before`, once the draft tokens counter reaches `drafted`
    (metrics are updated right after the step that answered the request)."""
    deadline = time.monotonic() + timeout
    while True:
        now = spec_metrics(base)
        delta = {k: v - before.get(k, 0.0) for k, v in now.items()}
        if delta.get(SPEC + "draft_tokens_total", 0) >= drafted or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def greedy_chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                          max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3,
                                          **kw)


def tokens_of(resp) -> list:
    return [(t.token, t.bytes, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
            for t in resp.choices[0].logprobs.content]


def test_same_tokens_and_logprobs_as_without(spec_server, spec_client, server, client):
    """The module's first request: the server has no step times yet, so it drafts."""
    plain = greedy_chat(client, server.model)
    before = spec_metrics(spec_server.base)
    fast = greedy_chat(spec_client, spec_server.model)
    assert tokens_of(fast) == tokens_of(plain)
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert fast.usage.completion_tokens == plain.usage.completion_tokens
    # without speculation usage is as before: no completion_tokens_details
    assert plain.usage.completion_tokens_details is None
    details = fast.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    drafted = details.accepted_prediction_tokens + details.rejected_prediction_tokens
    delta = settled_delta(spec_server.base, before, drafted)
    assert delta[SPEC + "draft_tokens_total"] == drafted
    assert delta[SPEC + "accepted_tokens_total"] == details.accepted_prediction_tokens
    assert 0 < delta[SPEC + "drafts_total"] <= drafted
    per_pos = sum(v for k, v in delta.items() if "per_pos" in k)
    assert per_pos == details.accepted_prediction_tokens
    assert delta[SPEC + "accepted_tokens_per_pos_total[0]"] > 0


def test_streaming_same_text_and_usage(spec_server, spec_client):
    whole = spec_client.chat.completions.create(model=spec_server.model, messages=MESSAGES,
                                                temperature=0, max_tokens=MAX_TOKENS)
    before = spec_metrics(spec_server.base)
    chunks = list(spec_client.chat.completions.create(
        model=spec_server.model, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage.completion_tokens == whole.usage.completion_tokens
    # the counts vary from run to run (draft lengths follow measured step times, and on a
    # busy machine drafting may pause), the text does not; they agree with /metrics
    d = usage.completion_tokens_details
    assert d is not None and d.accepted_prediction_tokens >= 0
    drafted = d.accepted_prediction_tokens + d.rejected_prediction_tokens
    delta = settled_delta(spec_server.base, before, drafted)
    assert delta[SPEC + "draft_tokens_total"] == drafted
    assert delta[SPEC + "accepted_tokens_total"] == d.accepted_prediction_tokens


def test_completions_usage_sums_choices(spec_server, spec_client, server, client):
    prompt = f"{PARAGRAPH}\n\nAgain, word for word:\n\n{PARAGRAPH[:60]}"
    kw = dict(prompt=prompt, temperature=0, max_tokens=48)
    plain = client.completions.create(model=server.model, **kw)
    before = spec_metrics(spec_server.base)
    fast = spec_client.completions.create(model=spec_server.model, n=2, **kw)
    assert [c.text for c in fast.choices] == [plain.choices[0].text] * 2
    d = fast.usage.completion_tokens_details
    assert d is not None and d.accepted_prediction_tokens >= 0     # see the streaming test
    drafted = d.accepted_prediction_tokens + d.rejected_prediction_tokens
    delta = settled_delta(spec_server.base, before, drafted)
    assert delta[SPEC + "draft_tokens_total"] == drafted       # both choices counted
    assert delta[SPEC + "accepted_tokens_total"] == d.accepted_prediction_tokens
    assert plain.usage.completion_tokens_details is None
    stream = list(spec_client.completions.create(model=spec_server.model, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in stream if c.choices) == plain.choices[0].text
    assert stream[-1].usage.completion_tokens_details is not None


def test_metrics_and_log_when_off_and_on(spec_server, server, client):
    client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8)
    off = spec_metrics(server.base)
    assert off[SPEC + "drafts_total"] == 0 and off[SPEC + "draft_tokens_total"] == 0
    assert not any("per_pos" in k for k in off)
    on = spec_metrics(spec_server.base)        # the tests above ran first (module order)
    assert on[SPEC + "accepted_tokens_total"] > 0
    text = httpx.get(spec_server.base + "/metrics", timeout=10).text
    assert "# HELP ostinato:spec_decode_num_drafts_total" in text or \
        "# HELP ostinato:spec_decode_num_drafts " in text
    assert "speculative decoding: ngram, up to 16 draft tokens" in full_log(spec_server)
    assert "speculative decoding: off" in full_log(server)


def full_log(server: Server) -> str:
    with open(server.log_path, errors="replace") as f:
        return f.read()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ostinato", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("cmd", ["serve", "generate", "chat"])
def test_help_names_the_flags(cmd):
    out = cli(cmd, "--help").stdout
    for flag in ("--speculative {ngram,suffix,draft}", "--num-speculative-tokens N",
                 "--draft-model NAME"):
        assert flag in out, out


@pytest.mark.parametrize("args, words", [
    (["serve", "--draft-model", "smollm2-135m-instruct"], "--draft-model goes with"),
    (["generate", "-p", "x", "--speculative", "ngram", "--draft-model", "m"],
     "--draft-model goes with"),
    (["chat", "--speculative", "draft"], "needs --draft-model"),
    (["serve", "--num-speculative-tokens", "4"], "--num-speculative-tokens goes with"),
    (["serve", "--speculative", "ngram", "--num-speculative-tokens", "0"], "1..64"),
    (["serve", "--speculative", "medusa"], "invalid choice"),
])
def test_bad_flags_one_line_exit_2(args, words):
    t0 = time.perf_counter()
    res = cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert lines[0].startswith(f"ostinato {args[0]}: error:")
    assert time.perf_counter() - t0 < 30            # refused before any model loads
