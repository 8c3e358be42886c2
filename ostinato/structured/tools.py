"""Tool calling: checking OpenAI tool definitions, writing them and a conversation's earlier
calls into the prompt, the grammar that holds the output to calls, and the streaming parser
that reads the calls back (toolparse.py). One format per template family:

    hermes   <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>  (Qwen 2.5/3, Hermes)
    llama3   {"name": ..., "parameters": {...}}  (Llama 3.x; optional <|python_tag|>; ';' between)
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  (Mistral v3: Nemo, 7B v0.3)
    mistral_args  [TOOL_CALLS]name[ARGS]{...} per call, optionally [CALL_ID]id before [ARGS]
             (Mistral Small 3.2, Devstral, Ministral 3)
    generic  {"tool_calls": [{"name": ..., "arguments": {...}}, ...]} or {"response": "..."}
             (for templates with no tool syntax, e.g. SmolLM2, Gemma 3: the tools and the
             answer's form are written into the system message, the output is held to it)

The model's own template writes the tools for hermes, llama3 and the mistrals. Mistral's
templates take only call ids of 9 letters and digits: calls read in those families get such
ids. tool_choice
"required" and a named function are held by a grammar in every family; "auto" is held
lazily in hermes (free text until `<tool_call>`, then a call of one of the tools) and wholly
in generic (one of the two JSON forms); llama3's and the mistrals' "auto" is parsed, not
held."""
from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field

from .compiler import json_rule

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")      # OpenAI's rule for a function name
FAMILIES = ("hermes", "llama3", "mistral", "mistral_args", "generic")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
PYTHON_TAG = "<|python_tag|>"
_ALNUM = string.ascii_letters + string.digits


def new_call_id(family: str | None = None) -> str:
    """A call's id: OpenAI's form, or 9 letters and digits where Mistral's templates demand
    them."""
    if family in ("mistral", "mistral_args"):
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str                      # the arguments object as JSON text
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


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
        if set(tool) - {"type", "function"}:
            raise ValueError(f"{where}: unknown keys {sorted(set(tool) - {'type', 'function'})}")
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
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError(f"{where}.function.description: must be a string")
        out[name] = params
    return out


def check_tool_choice(tools: dict[str, dict] | None, choice) -> str | None:
    """The choice as "none" | "auto" | "required" | a function name (None: the default,
    "auto" with tools and "none" without); ValueError for anything else or an unknown
    function."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" \
            or not isinstance(name, str) or set(choice) - {"type", "function"} \
            or set(fn) - {"name"}:
        raise ValueError(f"tool_choice: {json.dumps(choice)[:60]} is not 'none', 'auto', "
                         "'required' or {'type': 'function', 'function': {'name': ...}}")
    if not tools or name not in tools:
        raise ValueError(f"tool_choice: no tool named {name!r} in tools "
                         f"({', '.join(tools or {}) or 'none given'})")
    return name


def call_schema(tools: dict[str, dict], args_key: str = "arguments") -> dict:
    """One call of any of `tools`: {"name": <const>, args_key: <its parameters>}."""
    each = [{"type": "object", "properties": {"name": {"const": n}, args_key: p},
             "required": ["name", args_key], "additionalProperties": False}
            for n, p in tools.items()]
    return each[0] if len(each) == 1 else {"anyOf": each}


def family_of(chat_template: str | None) -> str:
    """Which format this template writes calls in: by the markers it writes."""
    t = chat_template or ""
    if HERMES_OPEN in t:
        return "hermes"
    if MISTRAL_OPEN in t:
        return "mistral_args" if MISTRAL_ARGS in t else "mistral"
    if PYTHON_TAG in t or "ipython" in t:
        return "llama3"
    return "generic"


# ------------------------------------------------------------------ the plan of one request
@dataclass(frozen=True)
class ToolPlan:
    """What a chat request with tools needs: the family, the parsed tools, the choice
    ("none" | "auto" | "required" | a name) and whether calls may come several at once."""
    family: str
    tools: dict[str, dict]
    definitions: list[dict]             # the request's tool definitions, for the template
    choice: str
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the output is read for calls (tool_choice is not "none")."""
        return self.choice != "none"

    @property
    def many(self) -> bool:
        """Whether several calls may come (required or auto, parallel calls allowed)."""
        return self.parallel and self.choice in ("auto", "required")

    @property
    def reads_unheld(self) -> bool:
        """Whether calls may come that no grammar held (a bare hermes call, llama3's and the
        mistrals' auto): their arguments are checked when read (arguments_check)."""
        return self.choice == "auto" and self.family != "generic"

    @property
    def markers(self) -> tuple[str, ...]:
        """The family's markers that a vocabulary may hold as special tokens (the answer's
        text must keep them to be read)."""
        return {"llama3": (PYTHON_TAG,), "mistral": (MISTRAL_OPEN,),
                "mistral_args": (MISTRAL_OPEN, MISTRAL_ID, MISTRAL_ARGS)}.get(self.family, ())

    def allowed(self) -> dict[str, dict]:
        return self.tools if self.choice in ("auto", "required") else \
            {self.choice: self.tools[self.choice]}

    def calls_schema(self) -> dict:
        """A list of calls of the allowed tools: one or more, exactly one unless many."""
        return {"type": "array", "items": call_schema(self.allowed()), "minItems": 1,
                **({} if self.many else {"maxItems": 1})}

    def grammar(self, special_token) -> str | None:
        """The Lark grammar (llguidance's dialect) the output is held to, or None when it
        is free. special_token(text) -> a special token's id or None (a marker that is one
        must be named by id: special tokens are never spelled out of text)."""
        if not self.active:
            return None
        forced = self.choice != "auto"
        if self.family == "hermes":
            return _hermes_grammar(self.allowed(), forced, self.many)
        if self.family == "generic":
            return _generic_grammar(self.calls_schema(), forced)
        if not forced:
            return None             # llama3 / mistral "auto": parsed, not held
        if self.family == "llama3":
            return "start: " + json_rule(call_schema(self.allowed(), "parameters"))
        opener = _literal(MISTRAL_OPEN, special_token(MISTRAL_OPEN))
        if self.family == "mistral_args":       # [TOOL_CALLS]name[ARGS]{...}, per call
            args = _literal(MISTRAL_ARGS, special_token(MISTRAL_ARGS))
            call = " | ".join(f"{opener} {json.dumps(n)} {args} {json_rule(p)}"
                              for n, p in self.allowed().items())
            return f"start: call{'+' if self.many else ''}\ncall: {call}\n"
        return f"start: {opener} {json_rule(self.calls_schema())}"


def _literal(text: str, token: int | None) -> str:
    return f"<[{token}]>" if token is not None else json.dumps(text)


def _hermes_grammar(tools: dict[str, dict], forced: bool, many: bool) -> str:
    call = (f'call: "{HERMES_OPEN}\\n" ' + json_rule(call_schema(tools))
            + f' "\\n{HERMES_CLOSE}"')
    if forced:
        more = ' ("\\n" call)*' if many else ""
        return f"start: call{more}\n{call}\n"
    # free text until the lazy trigger <tool_call>, then a call (the trigger ends the text:
    # a lazy lexeme is taken where it first matches); with many, more text and calls may
    # follow; with one, the answer ends after its call
    return ("%llguidance {}\n"
            f"start: {'tagged* TEXT' if many else 'TEXT | tagged'}\n"
            "TEXT: /(.|\\n)*/\n"
            f'trigger[lazy]: TEXT "{HERMES_OPEN}"\n'
            "tagged: trigger body\n"
            'body: "\\n" ' + json_rule(call_schema(tools)) + f' "\\n{HERMES_CLOSE}"\n')


def _generic_grammar(calls: dict, forced: bool) -> str:
    form = {"type": "object", "properties": {"tool_calls": calls},
            "required": ["tool_calls"], "additionalProperties": False}
    if not forced:
        form = {"anyOf": [form, {"type": "object", "properties": {"response": {
            "type": "string"}}, "required": ["response"], "additionalProperties": False}]}
    return "start: " + json_rule(form)


def arguments_check(grammars, tokenizer, tools: dict[str, dict]):
    """valid(name, arguments) for the calls the grammar did not hold (ToolPlan.reads_unheld):
    the arguments text walked through the tool's schema, compiled as any schema is (cached). A schema that cannot be compiled cannot be checked:
    its calls pass."""
    from ..params import StructuredOutputsParams
    from .compiler import GrammarError

    def valid(name: str, arguments: str) -> bool:
        try:
            held = grammars.compile(StructuredOutputsParams(json=tools[name])).new_constraint()
        except (GrammarError, KeyError):
            return True
        try:
            for t in tokenizer.encode(arguments, add_special_tokens=False):
                if held.forbidden()[t]:
                    return False
                held.advance(t)
            end = held.forbidden()
            return not all(end[e] for e in grammars.eos_ids)
        except RuntimeError:            # the grammar refused a token, or allows none
            return False
    return valid


# ------------------------------------------------------------------ the prompt
def template_messages(messages: list[dict], plan: ToolPlan | None, family: str) -> list[dict]:
    """OpenAI messages as the chat template takes them: an assistant turn's calls with their
    arguments as objects (templates write them with tojson), content "" where it is null.
    In the generic family the tools and the answer's form go into the system message, earlier
    calls become the assistant's JSON and tool results user turns."""
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{k}] must be an object")
        if m.get("role") == "assistant" and m.get("tool_calls") is not None:
            m = {**m, "content": m.get("content") or "",
                 "tool_calls": [_template_call(c, k, i) for i, c in
                                enumerate(_list(m["tool_calls"], k))]}
        elif m.get("role") == "tool":
            _check_tool_message(m, k)
        out.append(m)
    if family == "generic":
        out = _generic_history(out)
        if plan is not None and plan.active:
            out = _with_system(out, generic_instructions(plan))
    return out


def _list(v, k: int) -> list:
    if not isinstance(v, list) or not v:
        raise ValueError(f"messages[{k}].tool_calls: must be a non-empty list")
    return v


def _template_call(c, k: int, i: int) -> dict:
    where = f"messages[{k}].tool_calls[{i}]"
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or c.get("type", "function") != "function":
        raise ValueError(f"{where}: must be {{'id', 'type': 'function', 'function': "
                         "{'name', 'arguments'}}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{where}.function.arguments: not valid JSON "
                             f"({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments: must be a JSON object")
    return {"id": c.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def _check_tool_message(m: dict, k: int) -> None:
    if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
        raise ValueError(f"messages[{k}].tool_call_id: must be a string")


def generic_instructions(plan: ToolPlan) -> str:
    tools = [{"name": n, **({"description": d} if (d := _description(plan, n)) else {}),
              "parameters": p} for n, p in plan.allowed().items()]
    lines = ["You can call these tools (their arguments are JSON objects held to these "
             "schemas):", json.dumps(tools, ensure_ascii=False), ""]
    if plan.choice == "auto":
        lines.append('Answer with one JSON object: {"tool_calls": [{"name": "<tool name>", '
                     '"arguments": {...}}]} to call tools, or {"response": "<your reply>"} '
                     "to reply to the user.")
    else:
        lines.append('Answer with one JSON object calling tools: {"tool_calls": [{"name": '
                     '"<tool name>", "arguments": {...}}]}.')
    return "\n".join(lines)


def _description(plan: ToolPlan, name: str) -> str | None:
    for t in plan.definitions:
        if t["function"]["name"] == name:
            return t["function"].get("description")
    return None


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = first.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return [{**first, "content": f"{content}\n\n{text}" if content else text},
                *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _generic_history(messages: list[dict]) -> list[dict]:
    """Earlier calls as the assistant's JSON; tool results (consecutive ones merged) as a
    user turn, so templates that only know user and assistant turns take them."""
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant",
                        "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif m.get("role") == "tool":
            item = json.dumps({"tool_response": {
                **({"tool_call_id": m["tool_call_id"]} if m.get("tool_call_id") else {}),
                "content": _text(m.get("content"))}}, ensure_ascii=False)
            if out and out[-1].get("_tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + item}
            else:
                out.append({"role": "user", "content": item, "_tool_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
