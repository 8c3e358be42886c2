"""Chat and text completions: request -> Job -> engine deltas -> OpenAI JSON or SSE chunks.

Choice numbering follows OpenAI: with P prompts and n choices each, choice c = p * n + i.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import lru_cache

from ..engine.async_engine import AsyncEngine, Delta
from ..sampling import SamplingParams
from .metrics import RequestOutcome, ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    bad_request,
)
from ..params import StructuredOutputsParams
from ..structured import GrammarError
from ..structured.compiler import after_thought, answer_lark
from ..structured.toolparse import (AnswerReader, CallArgs, CallStart, Reasoning, Text,
                                    prompt_in_thought, thinks)
from ..structured.tools import ToolPlan, arguments_check, family_of, template_messages
from ..tokenizer import ChatTemplateError

log = logging.getLogger("ostinato.server")
MIN_LOGPROB = -9999.0      # JSON has no -Infinity; vLLM sends the same stand-in
CONTEXT_EXCEEDED = "context_length_exceeded"    # OpenAI's error code for it


@dataclass
class Job:
    kind: str                           # "chat" | "completion"
    id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo_texts: list[str] | None = None     # completions with echo: each prompt's text
    echo_hidden: list[int] | None = None    # of each, leading tokens its text lacks (BOS)
    keep: int | None = None                 # best_of: the n best of params.n per prompt
    fingerprint: str | None = None          # system_fingerprint
    tools: ToolPlan | None = None           # chat: the tools, read back when active
    check_call: Callable | None = None      # chat: valid(name, arguments) of unheld calls
    think: bool | None = None               # chat: None, or whether the answer starts in
    created: int = field(default_factory=lambda: int(time.time()))     # a <think>

    def reader(self) -> AnswerReader | None:
        """A reader of one choice's answer, or None when its text is the answer as is."""
        family = self.tools.family if self.tools is not None and self.tools.active else None
        if family is None and self.think is None:
            return None
        return AnswerReader(family, self.think, set(self.tools.tools) if family else None,
                            self.check_call)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def num_returned(self) -> int:
        return len(self.prompts) * (self.keep or self.params.n)

    def prompt_of(self, choice: int) -> int:
        return choice // self.params.n


# ------------------------------------------------------------------------------ building
def chat_job(llm, req: ChatCompletionRequest, model: str, limits: Limits | None = None) -> Job:
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    template = llm.tokenizer.chat_template
    plan = req.tool_plan(template)
    text = render_chat(llm, req, plan, llm.max_model_len)
    check_text_length(llm, text, "messages", limits)
    ids = llm.chat_text_ids(text)
    req.check_token_ids(llm.config.vocab_size)
    max_tokens = _fit(llm.max_model_len, [ids], req.max_completion_tokens or req.max_tokens,
                      "messages", limits or Limits())
    think = prompt_in_thought(text) if thinks(template) else None
    params = _with_tools(llm, plan, req.sampling_params(max_tokens, req.requested_logprobs()))
    params, think = _after_thought(req, plan, params, think)
    compile_constraint(llm, req, params, plan)
    check = (arguments_check(llm.engine.grammars, llm.tokenizer, plan.tools)
             if plan is not None and plan.reads_unheld else None)
    return Job("chat", f"chatcmpl-{uuid.uuid4().hex}", model, [ids], params, req.stream,
               req.include_usage, tools=plan, think=think, check_call=check)


def render_chat(llm, req, plan: ToolPlan | None, cap: int) -> str:
    """The chat prompt's text: the messages (their calls and tool results as the template
    takes them) and, when tools are active, the tools (the template writes them, or the
    system message does in the generic family). A 400 before rendering more messages than
    `cap` tokens can hold: the template writes each with its role, a token at least (a
    --max-body-mb body holds 100,000s of them, which take the template seconds)."""
    family = family_of(llm.tokenizer.chat_template)
    writes_tools = plan is not None and plan.active and family != "generic"
    opts = req.template_options()
    try:
        messages = template_messages(req.messages, plan, family)
        if len(messages) > cap:
            raise bad_request(f"messages has {len(messages)} entries as the template takes "
                              f"them: more than {cap} tokens can hold", "messages")
        return llm.tokenizer.apply_chat_template(
            messages, opts["add_generation_prompt"], opts["continue_final_message"],
            opts["extra"], plan.definitions if writes_tools else None)
    except ChatTemplateError as e:
        raise bad_request(str(e), "chat_template_kwargs") from None
    except APIError:
        raise
    except Exception as e:          # bad roles or contents, template errors: the caller's
        raise bad_request(f"messages: {e}", "messages") from None


def _after_thought(req, plan: ToolPlan | None, params: SamplingParams,
                   think: bool | None) -> tuple[SamplingParams, bool | None]:
    """On a model that thinks, a constraint holds the answer after the thought. A grammar of
    the caller's own is not rewritten: it holds the answer from its first token, and the
    answer is then not read for a thought (think None)."""
    spec = params.structured_outputs
    if think is None or spec is None:
        return params, think
    try:
        lark = spec.grammar if plan is not None and plan.active else answer_lark(spec)
    except GrammarError as e:
        field = next(iter(req.constraints()))
        raise bad_request(f"{field}: {e}", field.split(".")[0]) from None
    if lark is None:
        return params, None
    held = StructuredOutputsParams(grammar=after_thought(lark, think))
    return dataclasses.replace(params, structured_outputs=held), think


def _with_tools(llm, plan: ToolPlan | None, params: SamplingParams) -> SamplingParams:
    """The grammar that holds the answer to the tool-call format; special tokens kept in the
    text when the format's marker is one ([TOOL_CALLS], <|python_tag|>)."""
    if plan is None or not plan.active:
        return params
    tok = llm.tokenizer

    def special(text: str) -> int | None:
        tid = tok.token_id(text)
        return tid if tid is not None and tok.is_special(tid) else None

    grammar = plan.grammar(special)
    keep_special = any(special(m) is not None for m in plan.markers)
    return dataclasses.replace(
        params, skip_special_tokens=params.skip_special_tokens and not keep_special,
        structured_outputs=StructuredOutputsParams(grammar=grammar) if grammar else None)


def completion_job(llm, req: CompletionRequest, model: str, limits: Limits | None = None) -> Job:
    prompts = req.prompt_list()
    ids = [prompt_ids(llm, p, limits=limits) for p in prompts]
    req.check_token_ids(llm.config.vocab_size)
    max_tokens = _fit(llm.max_model_len, ids, req.max_tokens, "prompt", limits or Limits())
    k = req.logprobs
    # echo + logprobs scores the prompt itself (lm-eval's log-likelihood); max_tokens 0 is
    # only allowed when the prompt is scored, so echo alone asks for its top-0 logprobs
    prompt_lps = k if (req.echo and k is not None) else (0 if req.echo and max_tokens == 0
                                                          else None)
    params = dataclasses.replace(req.sampling_params(max_tokens, k, prompt_lps),
                                 n=req.candidates)
    compile_constraint(llm, req, params)
    job = Job("completion", f"cmpl-{uuid.uuid4().hex}", model, ids, params, req.stream,
              req.include_usage, keep=req.n if req.candidates > req.n else None)
    if req.echo:
        job.echo_texts = [p if isinstance(p, str) else llm.detokenize(i)
                          for p, i in zip(prompts, ids)]
        job.echo_hidden = [_hidden_lead(llm.tokenizer, t, i)
                           for t, i in zip(job.echo_texts, ids)]
    return job


def compile_constraint(llm, req, params: SamplingParams, plan: ToolPlan | None = None) -> None:
    """Compile the request's output constraint now (this runs off the event loop and off the
    engine thread; the engine finds it cached): an invalid, unsupported or too complex one
    is a 400 before anything is queued or streamed."""
    specs = [params.structured_outputs] if params.structured_outputs is not None else []
    if plan is not None and plan.reads_unheld:
        # calls no grammar held have their arguments checked against these when read
        specs += [StructuredOutputsParams(json=p) for p in plan.tools.values()]
    try:
        for spec in specs:
            llm.engine.grammars.compile(spec)
    except GrammarError as e:
        field = "tools" if plan is not None and plan.active else next(iter(req.constraints()))
        raise bad_request(f"{field}: {e}", field.split(".")[0]) from None


def _hidden_lead(tokenizer, text: str, ids: list[int]) -> int:
    """Leading special tokens the tokenizer added that `text` does not spell (Gemma's
    <bos>): they take no room in the echoed text, so text_offset stays put for them."""
    n, lead = 0, ""
    while n < len(ids) and tokenizer.is_special(ids[n]):
        lead += tokenizer.decode([ids[n]])    # a special token decodes whole: no quadratic
        if text.startswith(lead):             # decode of the growing prefix
            break
        n += 1
    return n


def prompt_cap(llm, limits: Limits | None) -> int:
    """The most tokens a prompt may have: the context, or --max-prompt-tokens."""
    return min(llm.max_model_len, (limits and limits.max_prompt_tokens) or llm.max_model_len)


def check_text_length(llm, text: str, param: str, limits: Limits | None) -> None:
    """400 before tokenizing a text that cannot fit: more tokens than prompt_cap however it
    is tokenized (Tokenizer.fewest_tokens)."""
    cap = prompt_cap(llm, limits)
    fewest = llm.tokenizer.fewest_tokens(text, cap)
    if fewest > cap:
        raise APIError(400, f"{param} has {len(text)} characters, so at least {fewest} tokens: "
                       f"over the limit of {cap} (the model's context, or "
                       f"--max-prompt-tokens)", param,
                       CONTEXT_EXCEEDED if cap == llm.max_model_len else None)


def prompt_ids(llm, prompt: str | list[int], param: str = "prompt",
               limits: Limits | None = None) -> list[int]:
    if isinstance(prompt, str):
        check_text_length(llm, prompt, param, limits)
    try:
        ids = llm._prompt_ids(prompt)
    except (ValueError, TypeError) as e:
        raise bad_request(f"{param}: {e}", param) from None
    if not ids:
        raise bad_request(f"{param} is empty: it encodes to no tokens", param)
    return ids


def _fit(max_model_len: int, prompts: list[list[int]], max_tokens: int | None,
         param: str, limits: Limits) -> int:
    """max_tokens, defaulting to what remains of the context (at most --max-tokens-limit);
    400 when it does not fit or a prompt is over --max-prompt-tokens."""
    longest = max(len(p) for p in prompts)
    if limits.max_prompt_tokens is not None and longest > limits.max_prompt_tokens:
        raise bad_request(f"the prompt has {longest} tokens, over this server's limit of "
                          f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param)
    if max_tokens is None:
        max_tokens = max_model_len - longest
        if limits.max_tokens is not None:
            max_tokens = min(max_tokens, limits.max_tokens)
        if max_tokens < 1:
            raise APIError(400, f"the prompt has {longest} tokens, which leaves no room in "
                           f"this model's context of {max_model_len} tokens", param,
                           CONTEXT_EXCEEDED)
    if longest + max_tokens > max_model_len:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; "
                       f"the request asks for {longest + max_tokens} ({longest} in the "
                       f"prompt, {max_tokens} to generate)", param, CONTEXT_EXCEEDED)
    return max_tokens


# ------------------------------------------------------------------------------ running
@dataclass
class Choice:
    """One choice accumulated from its deltas (non-streaming)."""
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0

    @property
    def score(self) -> float:
        """best_of's measure, OpenAI's: the mean log-probability per generated token."""
        return self.cumulative_logprob / max(1, len(self.token_ids))

    def add(self, d: Delta) -> None:
        self.cumulative_logprob = d.cumulative_logprob
        self.text.append(d.text)
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs or ())
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finished:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason


class Generation:
    """Runs one Job on the engine; renders its JSON response or its SSE stream."""

    def __init__(self, job: Job, engine: AsyncEngine, metrics: ServerMetrics, tokenizer,
                 outcome: RequestOutcome | None = None, fault: bool = False):
        """outcome: settled once when the response ends (the caller settles it for
        non-streaming responses); fault: the fault-injection test hook marked this job."""
        self.job, self.engine, self.metrics = job, engine, metrics
        self.outcome = outcome or metrics.accept()
        self.fault = fault
        self.fmt = TokenFormat(tokenizer)
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}     # prompt -> tokens its choice 0 reused
        # speculative decoding on: choice -> (draft tokens verified, kept), its latest counts
        spec = getattr(getattr(engine, "engine", None), "speculator", None)
        self.drafts: dict[int, tuple[int, int]] | None = {} if spec is not None else None
        self._offsets: dict[int, int] = {}      # legacy logprobs' text_offset, per choice
        self._started: set[int] = set()         # streamed choices that had their echo
        readers = {c: job.reader() for c in range(job.num_choices)} if job.stream else {}
        self._readers = {c: r for c, r in readers.items() if r is not None}

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) of every prompt and choice as they come; leaving early
        aborts every engine request of the job."""
        job = self.job
        timer = self.metrics.track(sum(len(p) for p in job.prompts))
        gens = [self.engine.generate(p, job.params, f"{job.id}-{i}", fault=self.fault)
                for i, p in enumerate(job.prompts)]
        reasons, complete = [], False
        try:
            async with aclosing(merge(gens)) as merged:
                async for p, d in merged:
                    choice = p * job.params.n + d.index
                    if d.index == 0:
                        self.cached_tokens[p] = d.num_cached_tokens
                    timer.tokens(choice, len(d.token_ids))
                    self.completion_tokens += len(d.token_ids)
                    if self.drafts is not None:
                        self.drafts[choice] = (d.num_draft_tokens, d.num_accepted_tokens)
                    if d.finished:
                        reasons.append(d.finish_reason)
                    yield choice, d
            complete = True
            timer.done(reasons)
        finally:
            if not complete:
                timer.aborted()

    # -- non-streaming -------------------------------------------------------------------
    async def collect(self) -> dict:
        choices = [Choice(i) for i in range(self.job.num_choices)]
        async with aclosing(self.deltas()) as deltas:
            async for c, d in deltas:
                choices[c].add(d)
        if self.job.keep is not None:
            choices = self._best(choices)
        render = self._chat_choice if self.job.kind == "chat" else self._completion_choice
        return {**self._head(""), "choices": [render(c) for c in choices],
                "usage": self.usage()}

    def _best(self, choices: list[Choice]) -> list[Choice]:
        """best_of: of each prompt's candidates, the `keep` best by score (ties: the lower
        index), numbered p * keep + j."""
        n, keep, out = self.job.params.n, self.job.keep, []
        for p in range(len(self.job.prompts)):
            ranked = sorted(choices[p * n:(p + 1) * n], key=lambda c: (-c.score, c.index))
            for j, c in enumerate(ranked[:keep]):
                out.append(dataclasses.replace(c, index=p * keep + j))
        return out

    def _chat_choice(self, c: Choice) -> dict:
        lps = ({"content": self.fmt.chat_logprobs(c.token_ids, c.logprobs,
                                                  self.job.params.logprobs)}
               if self.job.params.logprobs is not None else None)
        message, finish = {"role": "assistant", "content": "".join(c.text)}, c.finish_reason
        reader = self.job.reader()
        if reader is not None:
            events = reader.feed(message["content"]) + reader.finish()
            message, finish = self._message(reader, events), _finish(reader, finish)
        return {"index": c.index, "message": message, "logprobs": lps,
                "finish_reason": finish, "stop_reason": c.stop_reason}

    def _message(self, reader: AnswerReader, events: list) -> dict:
        text = "".join(e.text for e in events if isinstance(e, Text))
        msg = {"role": "assistant", "content": text or (None if reader.calls else "")}
        if reader.calls:
            msg["tool_calls"] = [call.openai() for call in reader.calls]
        if self.job.think is not None:
            thought = "".join(e.text for e in events if isinstance(e, Reasoning)) or None
            msg["reasoning_content"] = msg["reasoning"] = thought
        return msg

    def _completion_choice(self, c: Choice) -> dict:
        text, lps = self._completion_text(c.index, "".join(c.text), c.token_ids, c.logprobs,
                                          c.prompt_logprobs, first=True,
                                          prompt=c.index // (self.job.keep or self.job.params.n))
        return {"index": c.index, "text": text, "logprobs": lps,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _completion_text(self, choice: int, text: str, ids, entries, prompt_lps, first: bool,
                         prompt: int | None = None):
        """The choice's text (with the echoed prompt on its first piece) and legacy logprobs."""
        job = self.job
        ids, entries, hidden = list(ids), list(entries), 0
        if first and job.echo_texts is not None:
            p = job.prompt_of(choice) if prompt is None else prompt
            text = job.echo_texts[p] + text
            ids = job.prompts[p] + ids
            entries = list(prompt_lps or [None] * len(job.prompts[p])) + entries
            hidden = job.echo_hidden[p]
        if job.params.logprobs is None:
            return text, None
        offset = self._offsets.get(choice, 0)
        lps, self._offsets[choice] = self.fmt.legacy_logprobs(ids, entries, offset, hidden)
        return text, lps

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        usage = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                 "total_tokens": prompt + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}
        if self.drafts is not None:     # OpenAI's predicted-output fields: drafts kept / not
            drafted = sum(d for d, _ in self.drafts.values())
            kept = sum(k for _, k in self.drafts.values())
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": kept,
                                                  "rejected_prediction_tokens": drafted - kept}
        return usage

    def _head(self, suffix: str) -> dict:
        obj = "chat.completion" if self.job.kind == "chat" else "text_completion"
        return {"id": self.job.id, "object": obj + suffix, "created": self.job.created,
                "model": self.job.model, "system_fingerprint": self.job.fingerprint}

    # -- streaming -----------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[bytes]:
        """SSE events: chunks, the usage chunk if asked, then [DONE]; a failure after the
        stream started ends it with an error event (the status line is already sent)."""
        try:
            if self.job.kind == "chat":
                for c in range(self.job.num_choices):
                    yield self._event(self._chunk(c, {"role": "assistant", "content": ""}))
            async with aclosing(self.deltas()) as deltas:
                async for c, d in deltas:
                    if self.job.kind == "chat" and c in self._readers:
                        parts = self._read_chunks(c, d)
                    else:
                        parts = split_finish(self._chat_chunk(c, d) if self.job.kind == "chat"
                                             else self._completion_chunk(c, d))
                    for part in parts:
                        yield self._event(part)
            if self.job.include_usage:
                head = self._head(".chunk" if self.job.kind == "chat" else "")
                yield self._event({**head, "choices": [], "usage": self.usage()})
        except Exception as e:
            log.exception("request %s failed while streaming", self.job.id)
            self.outcome.settle("error")
            yield _sse(error_body(e))
        self.outcome.settle("completed")        # no-op after an error
        yield b"data: [DONE]\n\n"

    def _event(self, chunk: dict) -> bytes:
        if self.job.include_usage:
            chunk.setdefault("usage", None)     # OpenAI: null on every chunk but the last
        return _sse(chunk)

    def _chunk(self, c: int, delta: dict, logprobs=None, finish: Delta | None = None) -> dict:
        key = "delta" if self.job.kind == "chat" else "text"
        choice = {"index": c, key: delta, "logprobs": logprobs,
                  "finish_reason": finish.finish_reason if finish else None}
        if finish is not None:
            choice["stop_reason"] = finish.stop_reason
        # OpenAI names chat chunks "chat.completion.chunk"; completion chunks keep their name
        head = self._head(".chunk" if self.job.kind == "chat" else "")
        return {**head, "choices": [choice]}

    def _chat_chunk(self, c: int, d: Delta) -> dict | None:
        want = self.job.params.logprobs
        lps = ({"content": self.fmt.chat_logprobs(d.token_ids, d.logprobs or (), want)}
               if want is not None and d.token_ids else None)
        if not (d.text or d.finished or lps):
            return None                         # text held back (half a character, ...)
        delta = {"content": d.text} if d.text else {}
        return self._chunk(c, delta, lps, d if d.finished else None)

    def _read_chunks(self, c: int, d: Delta) -> list[dict]:
        """A streamed chat choice read for its thought and calls: a chunk per run of text,
        thought, call head or arguments, then the finish alone."""
        reader = self._readers[c]
        events = reader.feed(d.text) + (reader.finish() if d.finished else [])
        chunks = [self._chunk(c, delta) for delta in stream_deltas(events)]
        want = self.job.params.logprobs
        if want is not None and d.token_ids:
            lps = {"content": self.fmt.chat_logprobs(d.token_ids, d.logprobs or (), want)}
            if chunks:
                chunks[0]["choices"][0]["logprobs"] = lps
            else:
                chunks.append(self._chunk(c, {}, lps))
        if d.finished:
            finish = self._chunk(c, {}, None, d)
            finish["choices"][0]["finish_reason"] = _finish(reader, d.finish_reason)
            chunks.append(finish)
        return chunks

    def _completion_chunk(self, c: int, d: Delta) -> dict | None:
        first = c not in self._started
        self._started.add(c)
        text, lps = self._completion_text(c, d.text, d.token_ids, d.logprobs or (),
                                          d.prompt_logprobs, first)
        if not (text or d.finished or lps):
            return None
        return self._chunk(c, text, lps, d if d.finished else None)


def _finish(reader: AnswerReader, reason: str | None) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the answer ended (not cut) in calls."""
    return "tool_calls" if reader.calls and reason == "stop" else reason


def stream_deltas(events: list) -> list[dict]:
    """Chat deltas of a reader's events: a run of text or thought is one delta; a call
    opens with its id, type and name (arguments ""), then its arguments' fragments."""
    out: list[dict] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, Text):
            if last is not None and set(last) == {"content"}:
                last["content"] += e.text
            else:
                out.append({"content": e.text})
        elif isinstance(e, Reasoning):
            if last is not None and "reasoning_content" in last:
                last["reasoning_content"] += e.text
                last["reasoning"] = last["reasoning_content"]
            else:
                out.append({"reasoning_content": e.text, "reasoning": e.text})
        elif isinstance(e, CallStart):
            out.append({"tool_calls": [{"index": e.index, "id": e.call.id, "type": "function",
                                        "function": {"name": e.call.name, "arguments": ""}}]})
        elif isinstance(e, CallArgs):
            item = (last or {}).get("tool_calls", [{}])[0]
            if last is not None and item.get("index") == e.index and "id" not in item:
                item["function"]["arguments"] += e.fragment
            else:
                out.append({"tool_calls": [{"index": e.index,
                                            "function": {"arguments": e.fragment}}]})
    return out


def split_finish(chunk: dict | None) -> list[dict]:
    """A finishing chunk that still carries text (or logprobs) is sent as two, as OpenAI
    sends them: the text, then one with nothing but the finish_reason. A client that stops
    reading at the finish_reason then loses no text (llama.cpp's tests read streams so)."""
    if chunk is None:
        return []
    choice = chunk["choices"][0]
    key = "delta" if "delta" in choice else "text"
    if choice["finish_reason"] is None or not (choice[key] or choice["logprobs"]):
        return [chunk]
    text = {k: v for k, v in choice.items() if k != "stop_reason"} | {"finish_reason": None}
    finish = choice | {key: {} if key == "delta" else "", "logprobs": None}
    return [chunk | {"choices": [text]}, chunk | {"choices": [finish]}]


async def merge(gens: list) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several async iterators as (which, item); closing this closes them all
    (their tasks are cancelled, so each engine request is aborted)."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g) -> None:
        try:
            async with aclosing(g):
                async for d in g:
                    q.put_nowait((i, d))
            q.put_nowait((i, None))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def error_body(e: Exception) -> dict:
    if isinstance(e, APIError):
        return e.body()
    if isinstance(e, ValueError):               # the engine refused this request's input
        return APIError(400, str(e)).body()
    return APIError(500, f"{type(e).__name__}: {e}").body()


# ------------------------------------------------------------------------------ logprobs
class TokenFormat:
    """Token ids -> the strings, bytes and finite logprobs OpenAI's JSON carries."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.text = lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))
        self.bytes = lru_cache(maxsize=1 << 16)(lambda t: list(tokenizer.token_to_bytes(t)))

    @staticmethod
    def lp(x: float) -> float:
        return x if math.isfinite(x) else MIN_LOGPROB

    def chat_logprobs(self, ids, entries, k: int) -> list[dict]:
        """OpenAI chat: per token {token, logprob, bytes, top_logprobs: k best by rank}."""
        out = []
        for tid, entry in zip(ids, entries):
            top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            out.append({**self._item(tid, entry[tid]),
                        "top_logprobs": [self._item(t, lp) for t, lp in top
                                         if lp.rank is not None and lp.rank <= k][:k]})
        return out

    def _item(self, tid: int, lp) -> dict:
        return {"token": self.text(tid), "logprob": self.lp(lp.logprob), "bytes": self.bytes(tid)}

    def legacy_logprobs(self, ids, entries, offset: int, hidden: int = 0) -> tuple[dict, int]:
        """OpenAI completions: parallel lists; None where nothing predicts the token (the
        first prompt token). top_logprobs holds the k best and the chosen token, as vLLM.
        The first `hidden` tokens are not in the text (an added BOS): no room in text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, (tid, entry) in enumerate(zip(ids, entries)):
            s = self.text(tid)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s) if i >= hidden else 0
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(self.lp(entry[tid].logprob))
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            out["top_logprobs"].append({self.text(t): self.lp(lp.logprob) for t, lp in ranked})
        return out, offset
