"""Tool-calling pieces (not yet wired to the server, which still refuses `tools`): checking
OpenAI tool definitions, the JSON schema that `tool_choice: "required"` or a named function
holds the output to, and parsers that read calls back out of a model's text, one per
template family:

    hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (Qwen 2.5, Hermes)
    llama3   {"name": ..., "parameters": {...}}  (Llama 3.x; optional <|python_tag|>; ';' between)
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    generic  [{"name": ..., "arguments": {...}}, ...]  (the constrained form, for models with
             no tool tokens: SmolLM2, Gemma 3)

A malformed call is left as text (no call), as llama.cpp's parsers do."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")      # OpenAI's rule for a function name
FAMILIES = ("hermes", "llama3", "mistral", "generic")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str                      # the arguments object as JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def check_tools(tools) -> dict[str, dict]:
    """name -> parameters schema of OpenAI tool definitions; ValueError naming the first bad
    one (index and what is wrong)."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools: must be a non-empty list of tool definitions")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f"{where}: only {{'type': 'function', 'function': {{...}}}} tools "
                             "are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}.function: must be an object with a string name")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise ValueError(f"{where}.function: unknown keys {sorted(unknown)}")
        name, params = fn["name"], fn.get("parameters", {"type": "object", "properties": {}})
        if not _NAME.match(name):
            raise ValueError(f"{where}.function.name {name!r}: letters, digits, _ and -, "
                             "at most 64")
        if name in out:
            raise ValueError(f"{where}.function.name {name!r}: defined twice")
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
        out[name] = params
    return out


def tool_choice_schema(tools: dict[str, dict], choice, parallel: bool = True) -> dict | None:
    """The JSON schema the output is held to (the generic form): None for "auto" / "none";
    for "required" an array of one or more calls (exactly one unless parallel); for a named
    function one call of it. ValueError for an unknown choice or function."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        calls = [_call_schema(n, p) for n, p in tools.items()]
        item = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {"type": "array", "items": item, "minItems": 1,
                **({} if parallel else {"maxItems": 1})}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        raise ValueError(f"tool_choice: {json.dumps(choice)[:60]} is not 'none', 'auto', "
                         "'required' or {'type': 'function', 'function': {'name': ...}}")
    if name not in tools:
        raise ValueError(f"tool_choice: no tool named {name!r} in tools "
                         f"({', '.join(tools)})")
    return {"type": "array", "items": _call_schema(name, tools[name]), "minItems": 1,
            "maxItems": 1}


def _call_schema(name: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def family_of(chat_template: str | None) -> str:
    """Which parser reads this template's calls: by the markers the template writes."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "generic"


def parse_tool_calls(text: str, family: str) -> tuple[str | None, list[ToolCall]]:
    """(content left over or None, the calls) of a model's whole answer."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tool-call family {family!r}; known: {', '.join(FAMILIES)}")
    return {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral,
            "generic": _generic}[family](text)


def _call(obj, args_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):           # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> str | None:
    return text.strip() or None


def _hermes(text: str):
    calls, rest = [], text
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
        try:
            call = _call(json.loads(m.group(1)))
        except json.JSONDecodeError:
            call = None
        if call is not None:
            calls.append(call)
            rest = rest.replace(m.group(0), "", 1)
    return _content(rest), calls


def _llama3(text: str):
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return _content(text), []
    calls = []
    for part in _split_top_level(body, ";"):
        try:
            call = _call(json.loads(part), "parameters")
        except json.JSONDecodeError:
            call = None
        if call is None:
            return _content(text), []
        calls.append(call)
    return None, calls


def _mistral(text: str):
    head, sep, tail = text.partition("[TOOL_CALLS]")
    if not sep:
        return _content(text), []
    calls = _array_of_calls(tail.strip())
    return (_content(text), []) if calls is None else (_content(head), calls)


def _generic(text: str):
    calls = _array_of_calls(text.strip())
    return (_content(text), []) if calls is None else (None, calls)


def _array_of_calls(text: str) -> list[ToolCall] | None:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
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
