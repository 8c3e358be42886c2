"""OpenAI's Responses API (/v1/responses) as a translation onto chat completions.

A request becomes a chat request (`instructions` the system message, `input` items the
messages, function tools chat tools, `text.format` chat's response_format), which goes through
the same admission, template, limits, engine and tool-call parsing as /v1/chat/completions;
the chat result (or its stream of chunks) is turned back into a Response object (or the
Responses event stream, each event with its sequence_number).

Stored responses (`store`, true by default as OpenAI's): kept in this process's memory only,
at most STORE_MAX_COUNT of them and for at most STORE_MAX_AGE_S seconds, the oldest dropped
first; `previous_response_id` continues the conversation of a stored one (its input and output,
not its instructions, as OpenAI). GET /v1/responses/{id} reads one, DELETE drops it, POST
/v1/responses/{id}/cancel stops one that is still streaming (there is no background mode).
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from collections import OrderedDict
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .protocol import (
    APIError,
    ChatCompletionRequest,
    bad_request,
    check_refused,
    from_validation_error,
    parse_request,
)

ENCRYPTED = "reasoning.encrypted_content"
STORE_MAX_COUNT = 1000
STORE_MAX_AGE_S = 3600.0


# ------------------------------------------------------------------------------ shared
def chat_request(body: dict, rename: dict[str, str]) -> ChatCompletionRequest:
    """A chat request built by a translation, validated as a client's would be (so a chat
    feature this server refuses is refused here too); `rename` maps chat field names back to
    the caller's in error messages."""
    try:
        check_refused(body)
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items()
                                                     if v is not None})
    except ValidationError as e:
        err = from_validation_error(e)
    except APIError as e:
        err = e
    raise renamed(err, rename)


def renamed(err: APIError, rename: dict[str, str]) -> APIError:
    """The chat path's error, naming the translated API's fields."""
    for chat_name, name in rename.items():
        err.message = err.message.replace(f"{chat_name}:", f"{name}:")
        err.param = name if err.param == chat_name else err.param
    return err


async def admit_as(admit, state, raw: bytes, chat, rename: dict[str, str]):
    try:
        return await admit(state, raw, chat)
    except APIError as e:
        raise renamed(e, rename) from None


async def chat_chunks(stream):
    """The chat stream's SSE bytes as chunk dicts ({"error": ...} included), without [DONE];
    closing this closes the chat stream (the engine request is aborted)."""
    async with aclosing(stream) as events:
        async for raw in events:
            data = raw.decode().removeprefix("data: ").strip()
            if data and data != "[DONE]":
                yield json.loads(data)


def sse_event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps(data, ensure_ascii=False).encode() \
        + b"\n\n"


# ------------------------------------------------------------------------------ request
class ResponsesRequest(BaseModel):
    """Fields outside this schema are a 400 naming them; those here that ask for something
    this server lacks are refused in check()."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None     # kept on the stored response; no effect
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None
    background: bool | None = None
    service_tier: Literal["auto", "default"] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    # identify the user or client, or route OpenAI's cache: they never change the output
    # (client_metadata: Codex CLI's session and turn ids)
    client_metadata: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def check(self) -> None:
        reasoning, text = self.reasoning or {}, self.text or {}
        refuse = [("text", bool(set(text) - {"format", "verbosity"})
                   or text.get("verbosity") not in (None, "medium"),
                   "text settings other than format and verbosity 'medium' (the default)"),
                  ("background", bool(self.background), "background mode"),
                  ("include", bool(set(self.include or ()) - {ENCRYPTED}),
                   f"extra output data (include) other than {ENCRYPTED}"),
                  ("top_logprobs", bool(self.top_logprobs), "logprobs on responses"),
                  ("max_tool_calls", self.max_tool_calls is not None, "max_tool_calls"),
                  ("reasoning", bool(set(reasoning) - {"summary", "effort"}
                                     or reasoning.get("summary") not in (None, "auto")
                                     or reasoning.get("effort") not in (None, "none")),
                   "reasoning settings other than summary 'auto' (the thought is given whole "
                   "as reasoning_text; no summarizer) and effort 'none' (no thought)"),
                  ("stream_options", bool(self.stream_options and any(
                      self.stream_options.values())), "stream obfuscation")]
        for name, asked, what in refuse:
            if asked:
                raise bad_request(f"{name}: this server does not implement {what}", name)
        self._check_metadata()

    def _check_metadata(self) -> None:
        """OpenAI's bounds for metadata, 512 characters for the identifiers (all are kept
        with a stored response: 16 MB of them a request, a thousand responses, was 16 GB
        held for an hour)."""
        meta = self.metadata or {}
        if len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
            raise bad_request("metadata: at most 16 pairs, keys of at most 64 characters and "
                              "values of at most 512", "metadata")
        for name in ("user", "safety_identifier", "prompt_cache_key"):    # stored likewise
            if len(getattr(self, name) or "") > 512:
                raise bad_request(f"{name}: at most 512 characters", name)


def _text_of(content, where: str) -> str:
    """A message's content: a string, or input_text/output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "input")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise bad_request(f"{where}.content[{j}]: part type {kind!r} is not supported "
                              "(text parts only: no images, files or audio)", "input")
        out.append(_part_text(part, f"{where}.content[{j}]"))
    return "".join(out)


def _part_text(part: dict, where: str) -> str:
    text = part.get("text", "")
    if not isinstance(text, str):
        raise bad_request(f"{where}.text must be a string, not {type(text).__name__}", "input")
    return text


def _input_message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad_request(f"{where}.role {role!r} must be user, assistant, system or "
                          "developer", "input")
    return {"role": "system" if role == "developer" else role,
            "content": _text_of(item.get("content", ""), where)}


def _input_item(item, where: str, messages: list[dict]) -> None:
    """Appends the chat message(s) of one input item."""
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object", "input")
    kind = item.get("type", "message")
    if kind == "reasoning":         # a thought given back: the next assistant turn's
        messages.append({"role": "assistant", "content": None, THOUGHT: _thought_of(item)})
        return
    last = messages[-1] if messages else None
    thought = last.get(THOUGHT) if last is not None else None
    if thought is not None:
        messages.pop()
    if kind == "message":
        messages.append(_input_message(item, where))
        if thought is not None and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning_content"] = thought
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
        last = messages[-1] if messages else None
        if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
            # parallel calls: one assistant turn; a new one, as `last` may be a stored
            # response's (appending to it changed what previous_response_id gives later)
            messages[-1] = {**last, "tool_calls": [*last["tool_calls"], call]}
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        if thought is not None:
            messages[-1]["reasoning_content"] = thought
    elif kind == "function_call_output":
        out = item.get("output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else _text_of(out, where)})
    else:
        raise bad_request(f"{where}: input item type {kind!r} is not supported (message, "
                          "reasoning, function_call and function_call_output are)", "input")


THOUGHT = "__thought"       # a reasoning input item waiting for its assistant turn


def _thought_of(item: dict) -> str:
    """A reasoning item's thought: its reasoning_text content, else its encrypted_content
    as this server writes it (see encrypted())."""
    content, sealed = item.get("content") or [], item.get("encrypted_content")
    if not isinstance(content, list) or not isinstance(sealed, (str, type(None))):
        raise bad_request("a reasoning item's content must be a list of parts and its "
                          "encrypted_content a string", "input")
    text = "".join(_part_text(c, "a reasoning item's part") for c in content
                   if isinstance(c, dict) and c.get("type") == "reasoning_text")
    if text or not sealed:
        return text
    try:
        return base64.b64decode(item["encrypted_content"], validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("a reasoning item's encrypted_content is not one this server "
                          "wrote (base64 of the thought's UTF-8)", "input") from None


def encrypted(thought: str) -> str:
    """`encrypted_content` (include reasoning.encrypted_content): OpenAI's is the thought
    encrypted so that a client with store false can give it back. Here it is the thought's
    UTF-8 in base64, NOT encrypted: the thought is in the item's content already, and this
    is only its round-trip form."""
    return base64.b64encode(thought.encode()).decode()


def _convo_tail(convo: list[dict]) -> list[dict]:
    """A reasoning item with no assistant turn after it is left out of the prompt."""
    return [m for m in convo if THOUGHT not in m]


def _tool(t: dict, i: int) -> dict:
    if not isinstance(t, dict) or t.get("type") != "function":
        kind = t.get("type") if isinstance(t, dict) else t
        raise bad_request(f"tools[{i}]: tool type {kind!r} is not supported; this server "
                          "runs function tools only", "tools")
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
    return {"type": "function", "function": fn}


def _tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise bad_request(f"tool_choice {choice!r} is not supported: auto, none, required or "
                      "{'type': 'function', 'name': ...}", "tool_choice")


def _format(text: dict | None):
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise bad_request("text.format must be an object, e.g. {'type': 'text'}", "text")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        keys = ("name", "schema", "strict", "description")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if k in fmt}}
    raise bad_request(f"text.format type {fmt.get('type')!r} is not supported", "text")


RENAME = {"max_tokens": "max_output_tokens", "response_format": "text.format",
          "messages": "input"}


def to_chat(req: ResponsesRequest, history: list[dict]) -> tuple[ChatCompletionRequest, list]:
    """The chat request, and the conversation it carries (history + input, no instructions)."""
    convo = list(history)
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) \
        else req.input
    for i, item in enumerate(items):
        _input_item(item, f"input[{i}]", convo)
    convo = _convo_tail(convo)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body = {"model": req.model, "messages": system + convo, "max_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "stream": req.stream,
            "stream_options": {"include_usage": True} if req.stream else None,
            "response_format": _format(req.text),
            "tools": [_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None,
            "tool_choice": _tool_choice(req.tool_choice),
            "parallel_tool_calls": req.parallel_tool_calls,
            "chat_template_kwargs": {"enable_thinking": False}
            if (req.reasoning or {}).get("effort") == "none" else None}
    return chat_request(body, RENAME), convo


# ------------------------------------------------------------------------------ store
@dataclass
class Stored:
    response: dict
    convo: list[dict]                    # the chat messages, output included
    at: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class ResponseStore:
    """Bounded by count and age; the oldest go first."""

    def __init__(self, max_count: int = STORE_MAX_COUNT, max_age_s: float = STORE_MAX_AGE_S):
        self.max_count, self.max_age_s = max_count, max_age_s
        self.items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, entry: Stored) -> None:
        self.items[rid] = entry
        self.items.move_to_end(rid)
        while len(self.items) > self.max_count:
            self.items.popitem(last=False)

    def get(self, rid: str) -> Stored:
        self._expire()
        if rid not in self.items:
            raise APIError(404, f"no stored response with id {rid!r} (responses are kept in "
                           f"memory, at most {self.max_count} for {self.max_age_s:.0f} s)",
                           "response_id", "not_found")
        return self.items[rid]

    def _expire(self) -> None:
        now = time.monotonic()
        while self.items and now - next(iter(self.items.values())).at > self.max_age_s:
            self.items.popitem(last=False)


# ------------------------------------------------------------------------------ output
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(rid: str, req: ResponsesRequest, model: str, status: str,
                    output: list, usage: dict | None, created: int) -> dict:
    """Every field of the Response object, as the Open Responses spec lists them (required,
    null where it has no value): sampling settings as used (chat's defaults where the request
    left them out: temperature and top_p 1, no penalties), tools and reasoning echoed in
    their full shape. completed_at is set when the response completes."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    text = {**(req.text or {}), "format": (req.text or {}).get("format") or {"type": "text"}}
    reasoning = None if req.reasoning is None else {
        **req.reasoning, "effort": req.reasoning.get("effort"),
        "summary": req.reasoning.get("summary")}
    return {"id": rid, "object": "response", "created_at": created, "completed_at": None,
            "status": status, "model": model, "output": output, "usage": usage,
            "error": None, "incomplete_details": incomplete, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_logprobs": 0,
            "tool_choice": req.tool_choice or "auto",
            "tools": [_echo_tool(t) for t in req.tools or []],
            "text": text, "store": req.store, "truncation": "disabled",
            "reasoning": reasoning, "background": False,
            "service_tier": req.service_tier or "default", "user": req.user,
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key}


def _echo_tool(t: dict) -> dict:
    """A function tool as the response lists it: description, parameters and strict are
    always there (null when the request left them out)."""
    return {**t, "description": t.get("description"), "parameters": t.get("parameters"),
            "strict": t.get("strict")}


def completed(response: dict) -> dict:
    """completed_at: the time a response completed (null otherwise)."""
    done = response["status"] == "completed"
    return {**response, "completed_at": int(time.time()) if done else None}


def usage_of(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def message_item(text: str, status: str = "completed", iid: str | None = None) -> dict:
    return {"id": iid or _new_id("msg"), "type": "message", "role": "assistant",
            "status": status, "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: dict, status: str = "completed", iid: str | None = None) -> dict:
    fn = call.get("function") or {}
    return {"id": iid or _new_id("fc"), "type": "function_call", "status": status,
            "call_id": call.get("id") or _new_id("call"), "name": fn.get("name"),
            "arguments": fn.get("arguments") or ""}


def reasoning_item(thought: str, with_encrypted: bool, status: str = "completed",
                   iid: str | None = None) -> dict:
    """The thought whole as reasoning_text content; summary stays empty (no summarizer)."""
    item = {"id": iid or _new_id("rs"), "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": thought}] if status == "completed"
            else []}
    if with_encrypted:
        item["encrypted_content"] = encrypted(thought)
    return item


def output_of(message: dict, with_encrypted: bool = False) -> list[dict]:
    """A chat message as Responses output items: reasoning, text, function calls."""
    out = []
    thought = message.get("reasoning_content") or message.get("reasoning")
    if thought:
        out.append(reasoning_item(thought, with_encrypted))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        out.append(message_item(message.get("content") or ""))
    out.extend(call_item(c) for c in calls)
    return out


def convo_of(output: list[dict]) -> list[dict]:
    """The output items as chat messages, for previous_response_id."""
    msgs: list[dict] = []
    for item in output:
        if item["type"] == "message":
            item = {"type": "message", "role": "assistant", "content": item["content"]}
        _input_item(item, "output", msgs)
    return _convo_tail(msgs)


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def settle_items(output: list[dict], status: str) -> list[dict]:
    """A response cut short (max_output_tokens, cancelled) leaves its last item incomplete."""
    if status == "completed" or not output:
        return output
    return output[:-1] + [{**output[-1], "status": "incomplete"}]


# ------------------------------------------------------------------------------ streaming
class EventStream:
    """Chat chunks -> Responses events: created, in_progress, then per output item added /
    (reasoning_text deltas and done) or (content_part added, output_text deltas and done,
    content_part done) or (arguments deltas and done) / item done, and completed
    (incomplete at max_output_tokens)."""

    def __init__(self, head: dict, entry: Stored | None, with_encrypted: bool = False):
        self.head, self.entry, self.with_encrypted = head, entry, with_encrypted
        self.seq, self.output = 0, []
        self.open: dict | None = None           # the item being streamed
        self.calls: dict[int, int] = {}         # chat tool_calls index -> output index

    def event(self, kind: str, **data) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse_event(kind, data)

    def snapshot(self, status: str, usage: dict | None = None) -> dict:
        return {**self.head, "status": status, "usage": usage,
                "output": settle_items(self.output, "completed" if status == "in_progress"
                                       else status),
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None}

    async def run(self, stream):
        yield self.event("response.created", response=self.snapshot("in_progress"))
        yield self.event("response.in_progress", response=self.snapshot("in_progress"))
        finish, usage, status = None, None, None
        async with aclosing(chat_chunks(stream)) as chunks:
            async for chunk in chunks:
                if "error" in chunk:
                    status = "failed"
                    self.head["error"] = {"code": "server_error",
                                          "message": chunk["error"].get("message")}
                    break
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    for b in self._delta(choice.get("delta") or {}):
                        yield b
                    finish = choice.get("finish_reason") or finish
                if self.entry is not None and self.entry.cancelled:
                    status = "cancelled"
                    break
        if not self.output and status is None:      # nothing generated: an empty message
            for b in [*self._add(message_item("", "in_progress")),
                      self._part_event("response.content_part.added", "")]:
                yield b
        for b in self._close():
            yield b
        status = status or status_of(finish)
        self.final = completed(self.snapshot(status, usage_of(usage)))
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(
            status, "response.incomplete")
        yield self.event(kind, response=self.final)

    def _delta(self, delta: dict):
        if delta.get("reasoning_content"):
            if self.open is None or self.open["item"]["type"] != "reasoning":
                yield from self._close()
                yield from self._add(reasoning_item("", False, "in_progress"))
            self.open["text"].append(delta["reasoning_content"])
            yield self.event("response.reasoning_text.delta", delta=delta["reasoning_content"],
                             **self._where(content_index=0))
        if delta.get("content"):
            if self.open is None or self.open["item"]["type"] != "message":
                yield from self._close()
                yield from self._add(message_item("", "in_progress"))
                yield self._part_event("response.content_part.added", "")
            self.open["text"].append(delta["content"])
            yield self.event("response.output_text.delta", delta=delta["content"],
                             logprobs=[], **self._where(content_index=0))
        for tc in delta.get("tool_calls") or []:
            if tc.get("index", 0) not in self.calls:
                yield from self._close()
                self.calls[tc.get("index", 0)] = len(self.output)
                yield from self._add(call_item({**tc, "function": {
                    "name": (tc.get("function") or {}).get("name"), "arguments": ""}},
                    "in_progress"))
            args = (tc.get("function") or {}).get("arguments")
            if args:
                self.open["text"].append(args)
                yield self.event("response.function_call_arguments.delta", delta=args,
                                 **self._where())

    def _where(self, **more) -> dict:
        return {"item_id": self.open["item"]["id"], "output_index": self.open["index"], **more}

    def _part_event(self, kind: str, text: str) -> bytes:
        return self.event(kind, part=_text_part(text), **self._where(content_index=0))

    def _add(self, item: dict):
        self.open = {"item": item, "index": len(self.output), "text": []}
        self.output.append(item)
        yield self.event("response.output_item.added", item=item,
                         output_index=self.open["index"])

    def _close(self):
        if self.open is None:
            return
        item, text = self.open["item"], "".join(self.open["text"])
        if item["type"] == "message":
            yield self.event("response.output_text.done", text=text, logprobs=[],
                             **self._where(content_index=0))
            yield self._part_event("response.content_part.done", text)
            done = message_item(text, iid=item["id"])
        elif item["type"] == "reasoning":
            yield self.event("response.reasoning_text.done", text=text,
                             **self._where(content_index=0))
            done = reasoning_item(text, self.with_encrypted, iid=item["id"])
        else:
            yield self.event("response.function_call_arguments.done", arguments=text,
                             name=item["name"], **self._where())
            done = {**item, "status": "completed", "arguments": text}
        self.output[self.open["index"]] = done
        yield self.event("response.output_item.done", item=done, output_index=self.open["index"])
        self.open = None


# ------------------------------------------------------------------------------ routes
def add_responses_routes(app: FastAPI, state, admit, run_generation) -> None:
    """admit(state, raw, chat_request) -> Generation and run_generation(...) are the chat
    path's own (app.py)."""
    store = ResponseStore()
    app.state.responses = store

    @app.post("/v1/responses")
    async def create(request: Request):
        raw = await request.body()
        req = await parse_request(raw, ResponsesRequest)
        req.check()
        history = store.get(req.previous_response_id).convo if req.previous_response_id \
            else []
        chat, convo = to_chat(req, history)
        gen = await admit_as(admit, state, raw, chat, RENAME)
        rid, created = _new_id("resp"), int(time.time())
        head = response_object(rid, req, state.name, "in_progress", [], None, created)
        if req.stream:
            entry = Stored(head, convo) if req.store else None
            if entry is not None:
                store.put(rid, entry)
            return await run_generation(request, state, gen,
                                        on_stream=lambda s: _streamed(
                                            head, entry, s, convo,
                                            ENCRYPTED in (req.include or ())))
        return await run_generation(request, state, gen,
                                    on_result=lambda r: _finished(store, req, head, r, convo))

    @app.get("/v1/responses/{rid}")
    async def read(rid: str):
        return store.get(rid).response

    @app.delete("/v1/responses/{rid}")
    async def delete(rid: str):
        store.get(rid)
        del store.items[rid]
        return {"id": rid, "object": "response.deleted", "deleted": True}

    @app.post("/v1/responses/{rid}/cancel")
    async def cancel(rid: str):
        entry = store.get(rid)
        if entry.response["status"] != "in_progress":
            raise bad_request(f"response {rid} is {entry.response['status']}; only one that "
                              "is still streaming can be cancelled", "response_id")
        entry.cancelled = True
        entry.response = {**entry.response, "status": "cancelled"}
        return entry.response


def _finished(store: ResponseStore, req: ResponsesRequest, head: dict, chat: dict,
              convo: list[dict]) -> dict:
    choice = chat["choices"][0]
    status = status_of(choice["finish_reason"])
    output = settle_items(output_of(choice["message"], ENCRYPTED in (req.include or ())),
                          status)
    response = {**head, "status": status, "output": output,
                "usage": usage_of(chat.get("usage"))}
    if response["status"] == "incomplete":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    response = completed(response)
    if req.store:
        store.put(head["id"], Stored(response, convo + convo_of(output)))
    return response


async def _streamed(head: dict, entry: Stored | None, stream, convo: list[dict],
                    with_encrypted: bool):
    events = EventStream(head, entry, with_encrypted)
    async with aclosing(events.run(stream)) as out:
        async for b in out:
            yield b
    if entry is not None:       # after the last event: the stored copy is the final one
        entry.response = events.final
        entry.convo = convo + convo_of(events.output)
