"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) as a translation onto
chat completions: `system` becomes the system message, content blocks (text, tool_use,
tool_result) chat messages and tool calls, `tools`' input_schema chat function parameters,
`stop_sequences` chat's stop; the chat path renders, limits, runs and parses tool calls, and
its result (or stream) is turned back into a Message (or Anthropic's event stream). Errors on
these routes have Anthropic's shape: {"type": "error", "error": {"type", "message"}}.

Fields Anthropic's clients send that change nothing here, accepted and documented:
`metadata` (user_id: identifies the end user), `cache_control` on the request, blocks and
tools (prompt-cache breakpoints: the prefix cache here is automatic), `service_tier` auto or
standard_only (there is one tier), `output_config.effort` "high" (Anthropic's default, so
the same as leaving it out; other levels are refused), `context_management` edits of type
clear_thinking_20251015 (done here: the thinking of older assistant turns is left out of the
prompt; keep "all" changes nothing). `thinking`: "adaptive" lets the model decide, which here
means its template does (a thinking template thinks, another does not); "disabled" asks a
thinking template not to think (enable_thinking false); "enabled" is refused, since a thought
cannot be held to budget_tokens. A thought comes back as a `thinking` block (streamed as
thinking_delta, then a signature_delta) before the text; thinking blocks sent back in an
assistant turn are given to the template as that turn's reasoning_content. A system message
inside `messages` (Claude Code's mid-conversation system beta) is a chat system message where
it stands. A tool_result's `is_error` is written into the tool message ("Error: ...").
Everything else outside the schema is a 400 naming it. The `anthropic-version` and
`anthropic-beta` headers (and Claude Code's `?beta=true` query) are not read: a beta only
matters through the body fields it enables, and those are checked here (SGLang answers 501 to
unknown betas; that would refuse Claude Code's usual headers). `output_config.format` (a JSON
schema) is enforced through chat's response_format; the anthropic 2.x client has no
temperature/top_p/top_k arguments, so those come in extra_body (still Anthropic's API fields).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from contextlib import aclosing
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .protocol import APIError, bad_request, parse_request
from .responses import admit_as, chat_chunks, chat_request, sse_event
from .serving import chat_job
from ..structured.toolparse import thinks
from .transport import anthropic_error

RENAME = {"stop": "stop_sequences", "response_format": "output_config.format"}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)     # Anthropic's range
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    thinking: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None     # automatic caching: the prefix cache is
    output_config: dict[str, Any] | None = None     # format: a JSON schema; effort high only
    context_management: dict[str, Any] | None = None    # clear_thinking edits only

    def check(self, template_thinks: bool = False) -> None:
        """template_thinks: the served model's template writes a <think> thought."""
        kind = (self.thinking or {}).get("type")
        if kind == "enabled":
            raise bad_request(
                "thinking: {'type': 'enabled'} is not supported: this server cannot hold a "
                "thought to budget_tokens" + ("" if template_thinks else
                                              ", and the served model does not think")
                + "; use {'type': 'adaptive'} (the model's template decides) or "
                "{'type': 'disabled'}", "thinking")
        if kind not in (None, "adaptive", "disabled"):
            raise bad_request(f"thinking type {kind!r} must be adaptive, disabled or "
                              "enabled", "thinking")
        unknown = set(self.output_config or {}) - {"format", "effort"}
        if unknown:
            raise bad_request(f"output_config: {', '.join(sorted(unknown))} is not "
                              "supported (format and effort 'high' are)", "output_config")
        effort = (self.output_config or {}).get("effort")
        if effort not in (None, "high"):
            raise bad_request(f"output_config.effort {effort!r}: this server does not "
                              "implement effort levels; 'high' (Anthropic's default, the same "
                              "as leaving it out) is accepted", "output_config")
        self.kept_thinking_turns()

    def kept_thinking_turns(self) -> int | None:
        """context_management's clear_thinking edit: how many of the latest assistant turns
        keep their thinking blocks (None: all of them)."""
        edits = (self.context_management or {}).get("edits") or []
        extra = set(self.context_management or {}) - {"edits"}
        if not isinstance(edits, list):
            raise bad_request("context_management.edits must be a list", "context_management")
        keep: int | None = None
        for edit in edits:
            if not isinstance(edit, dict) or edit.get("type") != "clear_thinking_20251015" \
                    or extra:
                raise bad_request("context_management: only the clear_thinking_20251015 edit "
                                  f"is supported, got {json.dumps(edit)[:80]}",
                                  "context_management")
            value = edit.get("keep", {"type": "thinking_turns", "value": 1})
            if value == "all":
                continue
            if not (isinstance(value, dict) and value.get("type") == "thinking_turns"
                    and isinstance(value.get("value"), int) and value["value"] >= 0):
                raise bad_request("context_management: clear_thinking keep must be 'all' or "
                                  "{'type': 'thinking_turns', 'value': N}", "context_management")
            keep = value["value"] if keep is None else min(keep, value["value"])
        return keep

    def template_kwargs(self) -> dict | None:
        """thinking disabled: a thinking template is asked not to think (Qwen3's and
        DeepSeek's enable_thinking); a template without the variable ignores it."""
        if (self.thinking or {}).get("type") == "disabled":
            return {"enable_thinking": False}
        return None

    def response_format(self) -> dict | None:
        fmt = (self.output_config or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise bad_request("output_config.format must be {'type': 'json_schema', "
                              "'schema': {...}}", "output_config")
        return {"type": "json_schema", "json_schema": {"name": "output",
                                                       "schema": fmt.get("schema")}}


class CountTokensRequest(MessagesRequest):
    max_tokens: int = 1         # count_tokens has none; 1 makes it a valid chat request


def _text(block: dict, where: str) -> str:
    if block.get("type") != "text":
        raise bad_request(f"{where}: block type {block.get('type')!r} is not supported here "
                          "(text only: no images or documents)", "messages")
    return _string(block, "text", where)


def _string(block: dict, key: str, where: str) -> str:
    """block[key], a string ('' when absent); 400 for any other type."""
    value = block.get(key, "")
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string, not {type(value).__name__}",
                          "messages")
    return value


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of blocks", "messages")
    for j, b in enumerate(content):
        if not isinstance(b, dict):
            raise bad_request(f"{where}.content[{j}] must be a block (an object), not "
                              f"{type(b).__name__}", "messages")
    return content


def _tool_result(block: dict, where: str) -> dict:
    content = block.get("content", "")
    text = content if isinstance(content, str) else "".join(
        _text(b, f"{where}.content[{j}]") for j, b in enumerate(_blocks(content, where)))
    if block.get("is_error"):
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _check_tool_block(b: dict, kind: str, role: str, where: str) -> None:
    need = {"tool_use": ("assistant", ("id", "name")),
            "tool_result": ("user", ("tool_use_id",))}
    owner, keys = need[kind]
    if role != owner:
        raise bad_request(f"{where}: a {kind} block belongs in a {owner} message", "messages")
    for key in keys:
        if not isinstance(b.get(key), str) or not b[key]:
            raise bad_request(f"{where}: a {kind} block needs {key}", "messages")


def _message(msg: dict, where: str, keep_thinking: bool = True) -> list[dict]:
    """One Anthropic message as chat messages (tool results become tool messages first).
    A system message in the list (Claude Code's mid-conversation system beta) is a chat
    system message where it stands; an assistant turn's thinking blocks become its
    reasoning_content, which the template writes or drops as it does for its own thoughts
    (keep_thinking False: context_management cleared them)."""
    role = msg.get("role") if isinstance(msg, dict) else None
    if role not in ("user", "assistant", "system"):
        raise bad_request(f"{where}.role must be user, assistant or system, not {role!r}",
                          "messages")
    if role == "system":
        return [{"role": "system", "content": "".join(
            _text(b, f"{where}.content[{j}]")
            for j, b in enumerate(_blocks(msg.get("content"), where)))}]
    texts, calls, results, thoughts = [], [], [], []
    for j, b in enumerate(_blocks(msg.get("content"), where)):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind in ("tool_use", "tool_result"):
            _check_tool_block(b, kind, role, at)
        if kind in ("thinking", "redacted_thinking"):
            if role != "assistant" or kind == "redacted_thinking":
                raise bad_request(f"{at}: a {kind} block is only accepted in an assistant "
                                  "message and as this server writes it (thinking, not "
                                  "redacted_thinking)", "messages")
            thoughts.append(_string(b, "thinking", at))
        elif kind == "tool_use":
            calls.append({"id": b.get("id"), "type": "function", "function": {
                "name": b.get("name"), "arguments": json.dumps(b.get("input", {}))}})
        elif kind == "tool_result":
            results.append(_tool_result(b, at))
        else:
            texts.append(_text(b, at))
    out = results
    if texts or calls or not results:
        chat = {"role": role, "content": "".join(texts) if texts or not calls else None}
        if thoughts and keep_thinking:
            chat["reasoning_content"] = "".join(thoughts)
        out = out + [chat | ({"tool_calls": calls} if calls else {})]
    return out


def _tool(t: dict, i: int) -> dict:
    if not isinstance(t, dict) or t.get("type") not in (None, "custom") \
            or "input_schema" not in t:
        raise bad_request(f"tools[{i}]: only custom tools with a name and an input_schema "
                          f"are supported, got {json.dumps(t)[:80]}", "tools")
    fn = {"name": t.get("name"), "parameters": t["input_schema"]}
    if t.get("description"):
        fn["description"] = t["description"]
    return {"type": "function", "function": fn}


def _tool_choice(choice: dict | None) -> tuple[Any, bool | None]:
    """(chat tool_choice, parallel_tool_calls)."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    named = {"type": "function", "function": {"name": choice.get("name")}}
    table = {"auto": "auto", "any": "required", "none": "none", "tool": named}
    if not isinstance(kind, str) or kind not in table:
        raise bad_request(f"tool_choice type {kind!r} must be auto, any, tool or none",
                          "tool_choice")
    return table[kind], parallel


def to_chat(req: MessagesRequest, count_only: bool = False):
    system = req.system if isinstance(req.system, str) or req.system is None else "\n".join(
        _text(b, f"system[{i}]") for i, b in enumerate(req.system))
    messages = [{"role": "system", "content": system}] if system else []
    keep = req.kept_thinking_turns()
    turns = [i for i, m in enumerate(req.messages) if isinstance(m, dict)
             and m.get("role") == "assistant"]
    kept = set(turns if keep is None else turns[len(turns) - keep:] if keep else [])
    for i, m in enumerate(req.messages):
        messages += _message(m, f"messages[{i}]", i in kept)
    choice, parallel = _tool_choice(req.tool_choice)
    body = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens,
            "stop": req.stop_sequences,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "stream": req.stream and not count_only,
            "stream_options": {"include_usage": True} if req.stream and not count_only
            else None,
            "tools": [_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None,
            "tool_choice": choice, "parallel_tool_calls": parallel,
            "response_format": req.response_format(),
            "chat_template_kwargs": req.template_kwargs()}
    return chat_request(body, RENAME)


# ------------------------------------------------------------------------------ output
def _input(arguments: str | None) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}


def stop_reason(finish: str | None, stop: Any, req: MessagesRequest) -> tuple[str, str | None]:
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str) and stop in (req.stop_sequences or ()):
        return "stop_sequence", stop
    return "end_turn", None


def usage_of(chat_usage: dict) -> dict:
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"] - cached,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": chat_usage["completion_tokens"]}


def tool_use_id(call_id: str | None) -> str:
    """A tool_use block's id in Anthropic's form, toolu_...: the chat call id with its call_
    prefix swapped (the same call's id in a message and in its stream). A client gives it
    back as the tool_result's tool_use_id, which the chat path takes as it is."""
    return "toolu_" + (call_id or uuid.uuid4().hex).removeprefix("call_").removeprefix("toolu_")


def signature(thought: str) -> str:
    """A thinking block's `signature`: Anthropic's is an opaque token that lets its API check
    the thought comes back unmodified. Here it is the hex SHA-256 of the thinking text: a
    client can check it, and this server does not require it when the block is sent back
    (nothing secret is in it; a thought is only ever given back to the template)."""
    return hashlib.sha256(thought.encode()).hexdigest()


def message_of(chat: dict, req: MessagesRequest, model: str) -> dict:
    choice = chat["choices"][0]
    msg, content = choice["message"], []
    thought = msg.get("reasoning_content")
    if thought:
        content.append({"type": "thinking", "thinking": thought,
                        "signature": signature(thought)})
    calls = msg.get("tool_calls") or []
    if msg.get("content") or not calls:
        content.append({"type": "text", "text": msg.get("content") or ""})
    for c in calls:
        content.append({"type": "tool_use", "id": tool_use_id(c["id"]),
                        "name": c["function"]["name"],
                        "input": _input(c["function"].get("arguments"))})
    reason, seq = stop_reason(choice["finish_reason"], choice.get("stop_reason"), req)
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": reason, "stop_sequence": seq,
            "usage": usage_of(chat["usage"])}


class EventStream:
    """Chat chunks -> message_start, ping, per block content_block_start / deltas
    (thinking_delta then signature_delta, text_delta, input_json_delta) /
    content_block_stop, message_delta, message_stop."""

    def __init__(self, req: MessagesRequest, model: str, prompt_tokens: int):
        self.req, self.model, self.prompt_tokens = req, model, prompt_tokens
        self.index = -1             # the open block's index
        self.open: str | None = None
        self.calls: set[int] = set()
        self.thought: list[str] = []        # the open thinking block's text, for its signature

    async def run(self, stream):
        yield sse_event("message_start", {"type": "message_start", "message": {
            "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}})
        yield sse_event("ping", {"type": "ping"})
        finish, stop, usage = None, None, None
        async with aclosing(chat_chunks(stream)) as chunks:
            async for chunk in chunks:
                if "error" in chunk:
                    err = chunk["error"]
                    yield sse_event("error", anthropic_error(err.get("code", 500)
                                    if isinstance(err.get("code"), int) else 500,
                                    err.get("message", "")))
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    for b in self._delta(choice.get("delta") or {}):
                        yield b
                    if choice.get("finish_reason"):
                        finish, stop = choice["finish_reason"], choice.get("stop_reason")
        for b in self._close():
            yield b
        reason, seq = stop_reason(finish, stop, self.req)
        yield sse_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": reason, "stop_sequence": seq},
            "usage": usage_of(usage) if usage else {"output_tokens": 0}})
        yield sse_event("message_stop", {"type": "message_stop"})

    def _start(self, kind: str, block: dict):
        yield from self._close()
        self.index += 1
        self.open = kind
        yield sse_event("content_block_start", {"type": "content_block_start",
                                                "index": self.index, "content_block": block})

    def _close(self):
        if self.open == "thinking":
            yield self._block_delta({"type": "signature_delta",
                                     "signature": signature("".join(self.thought))})
            self.thought = []
        if self.open is not None:
            yield sse_event("content_block_stop", {"type": "content_block_stop",
                                                   "index": self.index})
            self.open = None

    def _delta(self, delta: dict):
        if delta.get("reasoning_content"):
            if self.open != "thinking":
                yield from self._start("thinking", {"type": "thinking", "thinking": "",
                                                    "signature": ""})
            self.thought.append(delta["reasoning_content"])
            yield self._block_delta({"type": "thinking_delta",
                                     "thinking": delta["reasoning_content"]})
        if delta.get("content"):
            if self.open != "text":
                yield from self._start("text", {"type": "text", "text": ""})
            yield self._block_delta({"type": "text_delta", "text": delta["content"]})
        for tc in delta.get("tool_calls") or []:
            fn = tc.get("function") or {}
            if tc.get("index", 0) not in self.calls:
                self.calls.add(tc.get("index", 0))
                yield from self._start("tool_use", {"type": "tool_use",
                                                    "id": tool_use_id(tc.get("id")),
                                                    "name": fn.get("name"), "input": {}})
            if fn.get("arguments"):
                yield self._block_delta({"type": "input_json_delta",
                                         "partial_json": fn["arguments"]})

    def _block_delta(self, delta: dict) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta",
                                                 "index": self.index, "delta": delta})


# ------------------------------------------------------------------------------ routes
def _errors_as_anthropic(handler):
    async def wrapped(request: Request):
        try:
            response = await handler(request)
        except APIError as e:
            return JSONResponse(anthropic_error(e.status, e.message), e.status)
        if isinstance(response, JSONResponse) and response.status_code >= 400:
            body = json.loads(response.body)
            message = (body.get("error") or {}).get("message", "")
            return JSONResponse(anthropic_error(response.status_code, message),
                                response.status_code)
        return response
    return wrapped


def _thinks(state) -> bool:
    llm, _ = state.require()
    return thinks(llm.tokenizer.chat_template)


def add_anthropic_routes(app: FastAPI, state, admit, run_generation) -> None:
    """admit and run_generation are the chat path's own (app.py)."""

    async def create(request: Request):
        raw = await request.body()
        req = await parse_request(raw, MessagesRequest)
        req.check(_thinks(state))
        gen = await admit_as(admit, state, raw, to_chat(req), RENAME)
        if req.stream:
            events = EventStream(req, state.name, len(gen.job.prompts[0]))
            return await run_generation(request, state, gen, on_stream=events.run)
        return await run_generation(request, state, gen,
                                    on_result=lambda r: message_of(r, req, state.name))

    async def count_tokens(request: Request):
        req = await parse_request(await request.body(), CountTokensRequest)
        req.check(_thinks(state))
        llm, _ = state.require()
        state.check_model(req.model)
        chat = to_chat(req, count_only=True)
        job = await asyncio.to_thread(chat_job, llm, chat, state.name, state.limits)
        return {"input_tokens": len(job.prompts[0])}

    app.add_api_route("/v1/messages", _errors_as_anthropic(create), methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", _errors_as_anthropic(count_tokens),
                      methods=["POST"])
