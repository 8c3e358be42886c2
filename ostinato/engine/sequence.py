"""A sequence's state as it moves through the engine. Plain data, no torch."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # annotations only: this module stays free of the engine above it
    from ..params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)   # identity: `seq in running` must not compare token lists
class Sequence:
    seq_id: str
    request_id: str
    index: int                      # which of the request's n choices
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int                 # resolved: never past the model's context
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0    # tokens whose KV is in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict | None] | None = None
    cumulative_logprob: float = 0.0
    sampler_state: Any = None       # the runner's per-sequence generator
    output_state: Any = None        # the output processor's detokenizer and stop matcher
    # chain hashes of all_ids' full blocks, filled lazily by the KV-cache manager
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0        # times its KV was dropped and recomputed
    num_cached_tokens: int = 0      # prompt tokens the prefix cache gave at first admission
    # when the engine took the request (time.monotonic(); None: unknown). The scheduler only
    # compares sequences' arrivals (a burst, step_time.py), it reads no clock
    arrival_time: float | None = None
    pooling_state: Any = None       # the runner's running pool of the prompt's hidden states
    embedding: Any = None           # the pooled, normalised prompt (params.pooling)
    # speculative decoding: tokens guessed to follow all_ids, computed with the next step
    draft_ids: list[int] = field(default_factory=list)
    spec_state: Any = None          # its acceptance record and n-gram index (speculative.py)
    num_draft_tokens: int = 0       # draft tokens verified for it
    num_accepted_tokens: int = 0    # of those, tokens kept

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int             # tokens computed this step: (all_ids + draft)[start:start+n]
    start: int                      # == seq.num_computed_tokens when scheduled
    block_tables: list[list[int]]   # one block list per KV-cache group
    draft: list[int] = field(default_factory=list)   # the draft tokens among them (the last)

    @property
    def samples(self) -> bool:
        """After this step the cache holds every token, so the next token is sampled (and,
        with a draft, the tokens after each draft token while they agree)."""
        return self.start + self.num_new_tokens - len(self.draft) == self.seq.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step computes."""
        seq, stop = self.seq, self.start + self.num_new_tokens
        return seq.all_ids[self.start: stop - len(self.draft)] + self.draft


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)
