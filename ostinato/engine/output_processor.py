"""Turns sampled tokens into text: incremental detokenization, stop tokens and strings,
max_tokens. Emits what each sequence may show now (never half a character, never the start
of a stop string that may still complete)."""
from __future__ import annotations

from dataclasses import dataclass

from ..stop import StopStringMatcher
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .sequence import Sequence


@dataclass
class OutputState:
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    stop_ids: frozenset[int]        # params.stop_token_ids, looked up once per token


@dataclass
class SeqDelta:
    seq: Sequence
    text: str                       # new text safe to show
    token_ids: list[int]            # tokens added this step
    finished: bool
    error: Exception | None = None  # this sequence failed (finish_reason "error"); others go on


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_ids: set[int], max_model_len: int):
        self.tok, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len

    def start(self, seq: Sequence) -> None:
        p = seq.params
        seq.output_state = OutputState(
            IncrementalDetokenizer(self.tok, seq.prompt_ids, p.skip_special_tokens),
            StopStringMatcher(p.stop or [], p.include_stop_str_in_output),
            frozenset(p.stop_token_ids or ()))

    def append(self, seq: Sequence, token: int) -> tuple[str, str | None, int | str | None]:
        """Add one sampled token; returns (text to emit, finish reason, stop reason)."""
        seq.output_ids.append(token)
        p, st = seq.params, seq.output_state
        may_stop = len(seq.output_ids) > p.min_tokens
        if may_stop and token in st.stop_ids:
            return self._drain(st), "stop", token
        if may_stop and token in self.eos_ids and not p.ignore_eos:
            return self._drain(st), "stop", None
        text, matched = st.stops.feed(st.detok.add(token))
        if matched:
            return text, "stop", st.stops.matched_stop
        if len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return text + self._drain(st), "length", None
        return text, None, None

    @staticmethod
    def _drain(st: OutputState) -> str:
        """What is held back at the end: an unfinished character, a stop-string prefix."""
        text, matched = st.stops.feed(st.detok.flush())
        return text if matched else text + st.stops.flush()
