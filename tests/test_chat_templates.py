"""Every real chat template llama.cpp ships (models/templates/*.jinja in the llama-cpp-python
sdist, fetched when absent) renders in our sandbox (ostinato.tokenizer.render_chat_template,
the environment Tokenizer.apply_chat_template uses) for a plain chat (system, user,
assistant, user) and a chat with tools (a tools list, an assistant tool call, a "tool"
result), and the output is byte-equal to HF transformers' rendering of the same inputs.

Where a template needs something else, it is named below with why:
  * REFUSES: the template raises its own error for these inputs (checked: ours raises it, and
    transformers raises the same message); then it is rendered on inputs it accepts.
  * TOOLS_REQUIRED: tool-use variants that iterate `tools` unconditionally; a chat with
    tools=None fails in both renderers (checked), so the plain chat is rendered with tools=[].
  * OWN_VARIABLES: templates reading variables of their own (passed as chat_template_kwargs).
  * STRING_ARGUMENTS: templates that want tool-call arguments as a JSON string (OpenAI's wire
    form) rather than the dict transformers' docs use.
  * NOT_IN_TRANSFORMERS: renders here, but transformers' sandbox fails on it (checked); the
    output is checked for the conversation's content instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ostinato.tokenizer import render_chat_template
from test_tokenizer_vectors import llama_cpp_models_dir

TEMPLATES = llama_cpp_models_dir() / "templates"
NAMES = sorted(p.name for p in TEMPLATES.glob("*.jinja"))

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PLAIN = [SYSTEM, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "City name"}}}}}]
CALL_ID = "9Xk2mP4qZ"      # 9 alphanumerics: Mistral's templates refuse any other id form
TOOL_CHAT = [SYSTEM, {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{
                 "id": CALL_ID, "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather",
              "content": '{"temp_c": 21}'}]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

# template -> case -> (error message regex, inputs it accepts instead: messages slice)
REFUSES = {
    "google-gemma-2-2b-it.jinja": {
        "plain": ("System role not supported", slice(1, None)),
        "tools": ("System role not supported", None),   # and no tool role: see below
    },
}
TOOLS_REQUIRED = {"CohereForAI-c4ai-command-r-plus-tool_use.jinja",
                  "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"}
OWN_VARIABLES = {"fireworks-ai-llama-3-firefunction-v2.jinja": {
    "functions": json.dumps([t["function"] for t in TOOLS]), "datetime": "2025-01-01"}}
STRING_ARGUMENTS = {"meetkai-functionary-medium-v3.2.jinja"}
# (template, case) -> the error transformers' sandbox gives
NOT_IN_TRANSFORMERS = {
    ("Kimi-K2-Instruct.jinja", "tools"): "access to attribute 'append' of 'list'",
    ("Kimi-K2-Thinking.jinja", "tools"): "access to attribute 'append' of 'list'",
    ("llama-cpp-deepseek-r1.jinja", "tools"): "generator is not JSON serializable",
}
# templates that do not write tool schemas or calls at all (no tool support in them)
NO_TOOLS_WRITTEN = {"HuggingFaceTB-SmolLM3-3B.jinja", "llama-cpp-rwkv-world.jinja",
                    "microsoft-Phi-3.5-mini-instruct.jinja",
                    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"}


def _inputs(name: str, case: str) -> dict:
    """The template variables for one (template, case), with the exceptions above applied."""
    if case == "plain":
        kw = {"messages": PLAIN, "tools": [] if name in TOOLS_REQUIRED else None}
    else:
        msgs = json.loads(json.dumps(TOOL_CHAT))
        if name in STRING_ARGUMENTS:
            call = msgs[2]["tool_calls"][0]["function"]
            call["arguments"] = json.dumps(call["arguments"])
        kw = {"messages": msgs, "tools": TOOLS}
    return {**kw, **OWN_VARIABLES.get(name, {})}


def _ours(name: str, case: str, **over) -> str:
    kw = {**_inputs(name, case), **over}
    return render_chat_template((TEMPLATES / name).read_text(encoding="utf-8"),
                                add_generation_prompt=True, documents=None, **SPECIAL, **kw)


def _theirs(name: str, case: str, **over) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template
    kw = {**_inputs(name, case), **over}
    messages = kw.pop("messages")
    out, _ = render_jinja_template([messages], chat_template=(TEMPLATES / name).read_text(
        encoding="utf-8"), add_generation_prompt=True, **SPECIAL, **kw)
    return out[0]


def _accepted(name: str, case: str) -> dict:
    """Overrides that turn a refused case into one the template accepts (or None)."""
    _, keep = REFUSES[name][case]
    return None if keep is None else {"messages": _inputs(name, case)["messages"][keep]}


def test_the_sdist_ships_the_templates():
    assert len(NAMES) >= 70, NAMES
    named = {*REFUSES, *TOOLS_REQUIRED, *OWN_VARIABLES, *STRING_ARGUMENTS, *NO_TOOLS_WRITTEN,
             *(n for n, _ in NOT_IN_TRANSFORMERS)}
    assert named <= set(NAMES), named - set(NAMES)


@pytest.mark.parametrize("case", ["plain", "tools"])
@pytest.mark.parametrize("name", NAMES)
def test_template_renders(name, case):
    if case in REFUSES.get(name, {}):
        with pytest.raises(ValueError, match=REFUSES[name][case][0]):
            _ours(name, case)
        over = _accepted(name, case)
        if over is None:
            return
        out = _ours(name, case, **over)
    else:
        out = _ours(name, case)
    if case == "plain":
        assert "What is 2+2?" in out and "And 3+3?" in out, out
    else:
        assert "Weather in Paris?" in out, out
        if name not in NO_TOOLS_WRITTEN:
            assert "get_weather" in out and "Paris" in out, out


@pytest.mark.parametrize("case", ["plain", "tools"])
@pytest.mark.parametrize("name", NAMES)
def test_template_matches_transformers(name, case):
    pytest.importorskip("transformers")
    import jinja2
    if (name, case) in NOT_IN_TRANSFORMERS:
        with pytest.raises(Exception, match=NOT_IN_TRANSFORMERS[name, case]):
            _theirs(name, case)
        return
    over = {}
    if case in REFUSES.get(name, {}):
        with pytest.raises(jinja2.TemplateError, match=REFUSES[name][case][0]):
            _theirs(name, case)
        over = _accepted(name, case)
        if over is None:
            return
    assert _ours(name, case, **over) == _theirs(name, case, **over)


@pytest.mark.parametrize("name", sorted(TOOLS_REQUIRED))
def test_tool_use_templates_need_tools(name):
    """Both renderers fail the same way on tools=None (why these get tools=[] above)."""
    with pytest.raises(TypeError, match="'NoneType' object is not iterable"):
        _ours(name, "plain", tools=None)
    pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="'NoneType' object is not iterable"):
        _theirs(name, "plain", tools=None)


def test_gemma2_has_no_tool_role():
    """Without the system message, Gemma 2's template still refuses the tool chat: its roles
    must alternate user/assistant, and it has no tool role."""
    name = "google-gemma-2-2b-it.jinja"
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        _ours(name, "tools", messages=TOOL_CHAT[1:])
    pytest.importorskip("transformers")
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        _theirs(name, "tools", messages=TOOL_CHAT[1:])


@pytest.mark.model
def test_qwen_gguf_template_renders_chatml_with_tools():
    """The embedded Qwen2.5-Coder's own template, through Tokenizer.apply_chat_template."""
    from modelfiles import model_file as _model_file
    from ostinato.loader.gguf import read_gguf
    from ostinato.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(_model_file("qwen2.5-coder-0.5b-instruct")).metadata)
    plain = tok.apply_chat_template(PLAIN)
    assert plain.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert plain.endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(plain)
    assert ids.count(tok.token_id("<|im_start|>")) == 5
    tools = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in tools
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in tools
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in tools
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template
    theirs, _ = render_jinja_template([TOOL_CHAT], tools=TOOLS, chat_template=tok.chat_template,
                                      add_generation_prompt=True, bos_token=tok.bos_token,
                                      eos_token=tok.eos_token)
    assert tools == theirs[0]
