"""Reading a chat answer back as it streams: the thought (`<think>...</think>`), the text and
the tool calls.

Both modes run the same machines: a streamed answer is fed piece by piece, a whole one in one
piece, and the events are the same whatever the pieces (tests/test_toolparse.py splits answers
at every point). So the streamed deltas concatenate to exactly the non-streamed message.

    parser = ToolCallParser("hermes")
    for piece in pieces:
        events = parser.feed(piece)      # [Text(...), CallStart(...), CallArgs(...), ...]
    events += parser.finish()

A hermes call whose text starts {"name": "...", "arguments": streams its arguments as they
come (the raw JSON text the model writes); any other call is read whole when it ends and its
arguments re-serialised. A call that does not parse stays in the text, as llama.cpp and vLLM
leave it."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .tools import (FAMILIES, HERMES_CLOSE, HERMES_OPEN, MISTRAL_ARGS, MISTRAL_ID, MISTRAL_OPEN,
                    PYTHON_TAG, ToolCall, new_call_id)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Text:
    text: str


@dataclass
class Reasoning:
    text: str


@dataclass
class CallStart:
    index: int
    call: ToolCall          # its id and name; arguments: what is known when it starts ("")


@dataclass
class CallArgs:
    index: int
    fragment: str


Event = Text | Reasoning | CallStart | CallArgs


def _held_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _Trim:
    """Drops the whitespace at the start and end of the text and right after a call, the
    same whether the text comes whole or in pieces: trailing whitespace is held until text
    follows it (so "Hi <call> bye" reads "Hi bye")."""

    def __init__(self, make):
        self.make, self.pending, self.started, self.fresh = make, "", False, False

    def add(self, text: str) -> list[Event]:
        if self.fresh or not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.fresh = False
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        if not body:
            return []
        self.started = True
        return [self.make(body)]

    def cut(self) -> None:
        """A call may follow: the whitespace after it is dropped (before it, it is kept for
        text that comes later)."""
        self.fresh = True


# A call's head whose arguments can stream: {"name": "...", "arguments": then the first
# character of the arguments object (so the head's whitespace is known whatever the pieces)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"'
                   r'\s*:\s*(?=\{)')


class ToolCallParser:
    """Text and calls out of an answer in one family's format (see tools.py)."""

    def __init__(self, family: str, names=None, valid=None):
        """names: the tools of the request; a call of any other name is left as text (None:
        any name). valid(name, arguments) -> bool: whether a call read whole holds its
        tool's schema (one that fails is text); calls that stream as they come are held by
        the grammar already."""
        if family not in FAMILIES:
            raise ValueError(f"unknown tool-call family {family!r}; known: "
                             f"{', '.join(FAMILIES)}")
        self.family = family
        self.names = frozenset(names) if names is not None else None
        self.valid = valid
        self.buf = ""
        self.marked = family in ("hermes", "mistral", "mistral_args")   # calls open with a tag
        self.state = "start" if family in ("hermes", "llama3", "generic") else "text"
        self.calls: list[ToolCall] = []
        self.text = _Trim(Text)
        self._sent = 0                  # arguments characters streamed of the open call
        self._open: ToolCall | None = None

    # -- feeding -------------------------------------------------------------------------
    def feed(self, piece: str) -> list[Event]:
        self.buf += piece
        out: list[Event] = []
        while True:
            step = getattr(self, f"_{self.state}")(out)
            if not step:
                return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self.state == "text":
            out += self.text.add(self.buf)
        elif self.state == "call":          # cut off inside a call
            held = _held_prefix(self.buf, HERMES_CLOSE) if self._open is not None else 0
            out += self._end_call(self.buf[:len(self.buf) - held], closed=False)
        elif self.state in ("start", "whole"):
            if self.family == "hermes" and HERMES_OPEN in self.buf \
                    and _bare_calls(self.buf) is None:
                text, self.buf, self.state = self.buf, "", "text"    # tagged calls after
                return self.feed(text) + self.finish()              # JSON-looking text
            out += self._read_whole(self.buf)
        elif self.state == "mistral":
            out += self._mistral_calls(self.buf)
        self.buf = ""
        self.text.cut()
        return out

    # -- states: each consumes what it can; True when the state changed (run again) ------
    def _text(self, out: list[Event]) -> bool:
        marker = HERMES_OPEN if self.family == "hermes" else MISTRAL_OPEN
        at = self.buf.find(marker) if self.marked else -1
        if at < 0:
            keep = _held_prefix(self.buf, marker) if self.marked else 0
            out += self.text.add(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        out += self.text.add(self.buf[:at])
        self.text.cut()
        self.buf = self.buf[at + len(marker):]
        self.state = "call" if self.family == "hermes" else "mistral"
        self._sent, self._open = 0, None
        return True

    def _start(self, out: list[Event]) -> bool:
        """llama3, generic and hermes: whether the answer is a bare call (or calls) shows at
        its first character. Small Qwen models often write hermes calls without the tags,
        or in a ```json block, as llama.cpp's parser also accepts."""
        head = self.buf.lstrip()
        tag = self.family == "llama3"
        if self.family == "generic" or head.startswith("{") or tag and head.startswith(
                PYTHON_TAG):
            self.state = "whole"
            return False
        if self.family == "hermes" and head.startswith("```"):
            line, newline, rest = head.partition("\n")
            rest = rest.lstrip()
            if not newline or not rest:
                return False                # the fence's first line or what follows: wait
            self.state = "whole" if line.strip() in ("```", "```json") and \
                rest.startswith("{") else "text"
            return self.state == "text"
        if not head or tag and PYTHON_TAG.startswith(head) or \
                self.family == "hermes" and "```".startswith(head):
            return False                    # may still be <|python_tag|> or a fence: wait
        self.state = "text"
        return True

    def _whole(self, out: list[Event]) -> bool:
        return False                        # read at the end

    def _read_whole(self, text: str) -> list[Event]:
        read = {"generic": _generic_calls, "llama3": _llama3_calls, "hermes": _bare_calls}
        calls = read[self.family](text)
        if isinstance(calls, str):          # generic's {"response": ...}
            return self.text.add(calls)
        if self._known(calls) is None:
            return self.text.add(text)
        return self._emit(calls)

    def _mistral(self, out: list[Event]) -> bool:
        return False                    # the calls run to the end of the answer

    def _call(self, out: list[Event]) -> bool:
        """hermes, inside <tool_call>: stream the arguments once the head is known."""
        at = self.buf.find(HERMES_CLOSE)
        body = self.buf if at < 0 else self.buf[:at]
        if self._open is None:
            m = _HEAD.match(body)
            if m:
                name = _json_string(m.group(1))
                if name is not None and self._known([ToolCall(name, "")]):
                    self._open = ToolCall(name, "", new_call_id(self.family))
                    self._args_at = m.end()
                    out.append(CallStart(len(self.calls), self._open))
        if at < 0:
            if self._open is not None:
                visible = body[:len(body) - _held_prefix(body, HERMES_CLOSE)]
                out += self._args_upto(visible)
            return False
        out += self._end_call(body, closed=True)
        self.buf = self.buf[at + len(HERMES_CLOSE):]
        self.state = "text"
        return True

    # -- calls ---------------------------------------------------------------------------
    def _args_text(self, body: str) -> str:
        """The open call's arguments as far as they are known: all but the object's closing
        brace (and the whitespace around it), which only the end tells. Only ever grows as
        the body does."""
        args = body[self._args_at:].rstrip()
        return args[:-1].rstrip() if args.endswith("}") else args

    def _args_upto(self, body: str) -> list[Event]:
        args = self._args_text(body)
        if len(args) <= self._sent:
            return []
        frag, self._sent = args[self._sent:], len(args)
        return [CallArgs(len(self.calls), frag)]

    def _end_call(self, body: str, closed: bool) -> list[Event]:
        if self._open is not None:          # streamed: its arguments are the raw text
            out = self._args_upto(body)
            self.calls.append(ToolCall(self._open.name, self._args_text(body), self._open.id))
            self._open = None
            return out
        call = _one_call(body)
        if self._known([call] if call else None) is None:   # not a call: back into the text
            tail = HERMES_OPEN + body + (HERMES_CLOSE if closed else "")
            return self.text.add(tail)
        return self._emit([call])

    def _known(self, calls: list[ToolCall] | None) -> list[ToolCall] | None:
        """The calls, if there are any and each names one of the request's tools (and holds
        its schema, where that is checked)."""
        if not calls or self.names is not None and any(c.name not in self.names
                                                       for c in calls):
            return None
        if self.valid is not None and not all(self.valid(c.name, c.arguments) for c in calls
                                              if c.arguments):
            return None
        return calls

    def _emit(self, calls: list[ToolCall]) -> list[Event]:
        out: list[Event] = []
        for c in calls:
            i, c = len(self.calls), ToolCall(c.name, c.arguments, new_call_id(self.family))
            self.calls.append(c)
            out += [CallStart(i, ToolCall(c.name, "", c.id)), CallArgs(i, c.arguments)]
        return out

    def _mistral_calls(self, text: str) -> list[Event]:
        calls = (_args_calls(text) if MISTRAL_ARGS in text else _array_of_calls(text.strip()))
        if self._known(calls) is None:
            return self.text.add(MISTRAL_OPEN + text)
        return self._emit(calls)


class ReasoningParser:
    """Splits `<think>...</think>` off the start of an answer. in_thought: the prompt ended
    inside an open <think> (the template opened it), so the answer starts in the thought."""

    def __init__(self, in_thought: bool = False):
        self.state = "thought" if in_thought else "start"
        self.buf = ""
        self.thought, self.text = _Trim(Reasoning), _Trim(Text)

    def feed(self, piece: str) -> list[Event]:
        self.buf += piece
        out: list[Event] = []
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN):], "thought"
            elif not head or THINK_OPEN.startswith(head):
                return out                  # may still be <think>: wait
            else:
                self.state = "text"
        if self.state == "thought":
            at = self.buf.find(THINK_CLOSE)
            if at < 0:
                keep = _held_prefix(self.buf, THINK_CLOSE)
                out += self.thought.add(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            out += self.thought.add(self.buf[:at])
            self.buf, self.state = self.buf[at + len(THINK_CLOSE):], "after"
        if self.state == "after":           # the text after a thought starts at its first
            self.buf = self.buf.lstrip()    # non-space character
            if not self.buf:
                return out
            self.state = "text"
        if self.buf:
            out.append(Text(self.buf))      # the text, as it is
        self.buf = ""
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self.state == "thought":         # cut off inside the thought
            out = self.thought.add(self.buf)
        elif self.state in ("start", "text") and self.buf:
            out = [Text(self.buf)]
        self.buf = ""
        return out


def thinks(chat_template: str | None) -> bool:
    """Whether this template's model writes its thought in <think>...</think>."""
    return bool(chat_template) and THINK_OPEN in chat_template and THINK_CLOSE in chat_template


def prompt_in_thought(prompt: str) -> bool:
    """The prompt ends inside an open <think> (e.g. DeepSeek-R1's template opens it)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


# ------------------------------------------------------------------ reading whole calls
def _json_string(raw: str) -> str | None:
    try:
        return json.loads(f'"{raw}"')
    except (ValueError, RecursionError):
        return None


def _call(obj, args_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):           # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    try:
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))
    except RecursionError:
        return None


def _one_call(body: str) -> ToolCall | None:
    try:
        return _call(json.loads(body))
    except (ValueError, RecursionError):
        return None


def _llama3_calls(text: str) -> list[ToolCall] | None:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    calls = []
    for part in _split_top_level(body, ";"):
        try:
            call = _call(json.loads(part), "parameters")
        except (ValueError, RecursionError):
            call = None
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _bare_calls(text: str) -> list[ToolCall] | None:
    """One or more call objects, one after another (whitespace between), and nothing else;
    perhaps in a ``` or ```json block."""
    decoder, text, at, calls = json.JSONDecoder(), text.strip(), 0, []
    if text.startswith("```"):
        text = text.partition("\n")[2].strip()
        text = text[:-3].strip() if text.endswith("```") else text
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        call = _call(obj)
        if call is None:
            return None
        calls.append(call)
        while at < len(text) and text[at].isspace():
            at += 1
    return calls or None


def _args_calls(text: str) -> list[ToolCall] | None:
    """name[ARGS]{...} calls, each after a [TOOL_CALLS] (the first one's already read); a
    [CALL_ID]id between the name and [ARGS] is the model's id for it (ours replaces it)."""
    calls = []
    for part in text.split(MISTRAL_OPEN):
        head, sep, args = part.partition(MISTRAL_ARGS)
        name = head.partition(MISTRAL_ID)[0].strip()
        if not sep or not name:
            return None
        try:
            call = _call({"name": name, "arguments": json.loads(args)})
        except (ValueError, RecursionError):
            return None
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _generic_calls(text: str) -> list[ToolCall] | str | None:
    """generic: the calls, or the reply of {"response": ...}, or None (neither)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and set(obj) == {"response"} and isinstance(obj["response"], str):
        return obj["response"]
    if isinstance(obj, dict) and set(obj) == {"tool_calls"}:
        return _array_of_calls(obj["tool_calls"])
    return None


def _array_of_calls(items) -> list[ToolCall] | None:
    if isinstance(items, str):
        try:
            items = json.loads(items)
        except (ValueError, RecursionError):
            return None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        return None
    calls = [_call(x) for x in items]
    return None if any(c is None for c in calls) else calls


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` outside JSON strings and brackets."""
    parts, depth, start, in_str, esc = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_str:              # inside a JSON string: only its end matters
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def parse_tool_calls(text: str, family: str) -> tuple[str | None, list[ToolCall]]:
    """(the text, or None when there is none; the calls) of a whole answer."""
    p = ToolCallParser(family)
    events = p.feed(text) + p.finish()
    content = "".join(e.text for e in events if isinstance(e, Text))
    return content or None, p.calls


class AnswerReader:
    """One choice's answer read as it streams: the thought split off first (when the
    template thinks), then the text read for calls (when tools are active)."""

    def __init__(self, family: str | None, think: bool | None, names=None, valid=None):
        """family: the call format, None when calls are not read; think: None when the
        template does not think, else whether the answer starts inside the thought; names:
        the request's tools (a call of another name is text); valid: ToolCallParser's."""
        self.thought = ReasoningParser(think) if think is not None else None
        self.tools = ToolCallParser(family, names, valid) if family is not None else None

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []

    def feed(self, piece: str) -> list[Event]:
        return self._read(self.thought.feed(piece) if self.thought else [Text(piece)])

    def finish(self) -> list[Event]:
        out = self._read(self.thought.finish()) if self.thought else []
        return out + (self.tools.finish() if self.tools else [])

    def _read(self, events: list[Event]) -> list[Event]:
        if self.tools is None:
            return [e for e in events if e.text] if events else []
        out: list[Event] = []
        for e in events:
            out += self.tools.feed(e.text) if isinstance(e, Text) else [e]
        return out
