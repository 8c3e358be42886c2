"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) as a translation onto
chat completions: `system` becomes the system message, content blocks (text, tool_use,
tool_result) chat messages and tool calls, `tools`' input_schema chat function parameters,
`stop_sequences` chat's stop; the chat path renders, limits, runs and parses tool calls, and
its result (or stream) is turned back into a Message (or Anthropic's event stream). Errors on
these routes have Anthropic's shape: {"type": "error", "error": {"type", "message"}}.

Fields Anthropic's clients send that change nothing here, accepted and documented:
`metadata` (user_id: identifies the end user), `cache_control` on the request, blocks and
tools (prompt-cache breakpoints: the prefix cache here is automatic), `service_tier` auto or
standard_only (there is one tier), `thinking` {"type": "disabled"}. A tool_result's
`is_error` is written into the tool message ("Error: ..."). Everything else outside the
schema is a 400 naming it. The `anthropic-version` and `anthropic-beta` headers are not
read: a beta only matters through the body fields it enables, and those are refused here
(SGLang answers 501 to unknown betas; that would refuse Claude Code's usual headers). `output_config.format` (a JSON schema) is enforced through chat's
response_format; the anthropic 2.x client has no temperature/top_p/top_k arguments, so
those come in extra_body (still Anthropic's API fields).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import aclosing
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .protocol import APIError, bad_request, parse_body
from .responses import admit_as, chat_chunks, chat_request, sse_event
from .serving import chat_job
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
    output_config: dict[str, Any] | None = None     # format: a JSON schema; effort refused

    def check(self) -> None:
        if self.thinking and self.thinking.get("type") != "disabled":
            raise bad_request("thinking: this server serves no extended-thinking model; "
                              "leave it unset or {'type': 'disabled'}", "thinking")
        unknown = set(self.output_config or {}) - {"format"}
        if unknown:
            raise bad_request(f"output_config: {', '.join(sorted(unknown))} is not "
                              "supported (format is)", "output_config")

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
    return str(block.get("text", ""))


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of blocks", "messages")
    return content


def _tool_result(block: dict, where: str) -> dict:
    content = block.get("content", "")
    text = content if isinstance(content, str) else "".join(
        _text(b, f"{where}.content[{j}]") for j, b in enumerate(content))
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


def _message(msg: dict, where: str) -> list[dict]:
    """One Anthropic message as chat messages (tool results become tool messages first)."""
    role = msg.get("role") if isinstance(msg, dict) else None
    if role not in ("user", "assistant"):
        raise bad_request(f"{where}.role must be user or assistant, not {role!r}", "messages")
    texts, calls, results = [], [], []
    for j, b in enumerate(_blocks(msg.get("content"), where)):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind in ("tool_use", "tool_result"):
            _check_tool_block(b, kind, role, at)
        if kind == "tool_use":
            calls.append({"id": b.get("id"), "type": "function", "function": {
                "name": b.get("name"), "arguments": json.dumps(b.get("input", {}))}})
        elif kind == "tool_result":
            results.append(_tool_result(b, at))
        else:
            texts.append(_text(b, at))
    out = results
    if texts or calls or not results:
        chat = {"role": role, "content": "".join(texts) if texts or not calls else None}
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
    if kind not in table:
        raise bad_request(f"tool_choice type {kind!r} must be auto, any, tool or none",
                          "tool_choice")
    return table[kind], parallel


def to_chat(req: MessagesRequest, count_only: bool = False):
    system = req.system if isinstance(req.system, str) or req.system is None else "\n".join(
        _text(b, f"system[{i}]") for i, b in enumerate(req.system))
    messages = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(req.messages):
        messages += _message(m, f"messages[{i}]")
    choice, parallel = _tool_choice(req.tool_choice)
    body = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens,
            "stop": req.stop_sequences,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "stream": req.stream and not count_only,
            "stream_options": {"include_usage": True} if req.stream and not count_only
            else None,
            "tools": [_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None,
            "tool_choice": choice, "parallel_tool_calls": parallel,
            "response_format": req.response_format()}
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


def message_of(chat: dict, req: MessagesRequest, model: str) -> dict:
    choice = chat["choices"][0]
    msg, content = choice["message"], []
    calls = msg.get("tool_calls") or []
    if msg.get("content") or not calls:
        content.append({"type": "text", "text": msg.get("content") or ""})
    for c in calls:
        content.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": _input(c["function"].get("arguments"))})
    reason, seq = stop_reason(choice["finish_reason"], choice.get("stop_reason"), req)
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": reason, "stop_sequence": seq,
            "usage": usage_of(chat["usage"])}


class EventStream:
    """Chat chunks -> message_start, ping, per block content_block_start / deltas
    (text_delta, input_json_delta) / content_block_stop, message_delta, message_stop."""

    def __init__(self, req: MessagesRequest, model: str, prompt_tokens: int):
        self.req, self.model, self.prompt_tokens = req, model, prompt_tokens
        self.index = -1             # the open block's index
        self.open: str | None = None
        self.calls: set[int] = set()

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
        if self.open is not None:
            yield sse_event("content_block_stop", {"type": "content_block_stop",
                                                   "index": self.index})
            self.open = None

    def _delta(self, delta: dict):
        if delta.get("content"):
            if self.open != "text":
                yield from self._start("text", {"type": "text", "text": ""})
            yield self._block_delta({"type": "text_delta", "text": delta["content"]})
        for tc in delta.get("tool_calls") or []:
            fn = tc.get("function") or {}
            if tc.get("index", 0) not in self.calls:
                self.calls.add(tc.get("index", 0))
                yield from self._start("tool_use", {"type": "tool_use", "id": tc.get("id"),
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


def add_anthropic_routes(app: FastAPI, state, admit, run_generation) -> None:
    """admit and run_generation are the chat path's own (app.py)."""

    async def create(request: Request):
        raw = await request.body()
        req = parse_body(raw, MessagesRequest)
        req.check()
        gen = await admit_as(admit, state, raw, to_chat(req), RENAME)
        if req.stream:
            events = EventStream(req, state.name, len(gen.job.prompts[0]))
            return await run_generation(request, state, gen, on_stream=events.run)
        return await run_generation(request, state, gen,
                                    on_result=lambda r: message_of(r, req, state.name))

    async def count_tokens(request: Request):
        req = parse_body(await request.body(), CountTokensRequest)
        req.check()
        llm, _ = state.require()
        state.check_model(req.model)
        chat = to_chat(req, count_only=True)
        job = await asyncio.to_thread(chat_job, llm, chat, state.name, state.limits)
        return {"input_tokens": len(job.prompts[0])}

    app.add_api_route("/v1/messages", _errors_as_anthropic(create), methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", _errors_as_anthropic(count_tokens),
                      methods=["POST"])
